"""Write Stable Diffusion checkpoints with random weights in the diffusers layout.

Real diffusers/transformers classes, the real CLIP vocabulary (tools/clip_vocab.py), safetensors weights.

* ``sd1-tiny``: SD1-style (quick_gelu CLIP, epsilon prediction, PNDM, pad <|endoftext|>), a 2-block VAE
  (scale factor 2) - small enough for unit tests.
* ``sd2-tiny``: SD2-style (gelu CLIP, v_prediction, linear projections, per-block attention head dims,
  upcast attention, pad "!", DDIM), a 3-block VAE (scale factor 4) with a non-default scaling_factor.
* ``sdxl-tiny``: SDXL-style: two text encoders of different widths (CLIP ViT-L-like, pad <|endoftext|>;
  OpenCLIP-bigG-like with projection, pad "!"), a UNet with ``text_time`` added conditioning, Euler
  (leading spacing) and ``force_zeros_for_empty_prompt``, a VAE with its own scaling factor and force_upcast.
* ``sdxl-refiner-tiny``: the refiner: second encoder only, aesthetic-score time ids, img2img pipeline.
* ``sdxl-turbo-tiny`` / ``sd-turbo-tiny``: the sdxl-tiny / sd2-tiny (epsilon) architectures with SDXL-Turbo's
  / SD-Turbo's scheduler (Euler ancestral / Euler, trailing spacing): used with guidance 0 and 1-4 steps.
* ``lcm-tiny``: an LCM-distilled SD1-style UNet (``time_cond_proj_dim``: the guidance embedding) with the
  LCM scheduler, saved as a LatentConsistencyModelPipeline.
* ``sd1-inpaint-tiny`` / ``sdxl-inpaint-tiny``: the sd1-tiny / sdxl-tiny architectures with a 9-channel
  inpainting UNet (latents, mask, masked-image latents), saved as StableDiffusion(XL)InpaintPipeline.
* ``sd15``: the full-size SD1.5 architecture (860M-parameter UNet) for benchmarks; never in tests.
* ``controlnet`` / ``t2i-adapter`` (with ``--base MODEL_DIR``): a random ControlNet (``ControlNetModel.from_unet``
  of the base's UNet, so it fits it; a conditioning embedding that downsamples the control image by the base's
  VAE scale factor unless ``embedding`` says otherwise) or T2I-Adapter (``full_adapter``, one feature per UNet
  down block at that block's width), saved as a diffusers model folder.
* ``sdxl``: the full-size SDXL base 1.0 architecture (2.6B-parameter UNet, CLIP ViT-L and OpenCLIP bigG text
  encoders, the SDXL VAE), its configs as stabilityai/stable-diffusion-xl-base-1.0 ships them, for benchmarks;
  never in tests (``sd15-inpaint``: its 9-channel inpainting form). Weights are saved in shards of at most 2 GB, so neither writing nor loading holds a whole
  component's file in memory twice.

    python -m tools.make_models sd1-tiny OUT_DIR [--seed N]
    python -m tools.make_models controlnet OUT_DIR --base MODEL_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from tools.clip_vocab import EOS, write_clip_tokenizer

KINDS = ("sd1-tiny", "sd2-tiny", "sdxl-tiny", "sdxl-refiner-tiny", "sdxl-turbo-tiny", "sd-turbo-tiny",
         "lcm-tiny", "sd1-inpaint-tiny", "sdxl-inpaint-tiny", "sd15", "sd15-inpaint", "sdxl")
CONTROL_KINDS = ("controlnet", "t2i-adapter")  # made for a base checkpoint (--base)
BENCHMARK_KINDS = ("sd15", "sd15-inpaint", "sdxl")  # full-size architectures: left at their random init, saved in shards
# inpainting UNets read the latents, the mask and the masked image's latents: 2 x latent channels + 1
INPAINT_KINDS = {"sd1-inpaint-tiny": "sd1-tiny", "sdxl-inpaint-tiny": "sdxl-tiny", "sd15-inpaint": "sd15"}

SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD2_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# stabilityai/stable-diffusion-xl-base-1.0 (and the refiner)
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
# stabilityai/sdxl-turbo: Euler ancestral, trailing; stabilityai/sd-turbo: Euler, trailing
SDXL_TURBO_SCHEDULER = {**SDXL_SCHEDULER, "_class_name": "EulerAncestralDiscreteScheduler",
                        "timestep_spacing": "trailing"}
SD_TURBO_SCHEDULER = {**SDXL_SCHEDULER, "timestep_spacing": "trailing"}
# SimianLuo/LCM_Dreamshaper_v7
LCM_SCHEDULER = {
    "_class_name": "LCMScheduler",
    "_diffusers_version": "0.22.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

# The tiny SDXL's encoders have different widths (32 and 48) and the second a projection of another (24),
# so a swapped or assumed width shows up as a shape error.
SDXL_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 hidden_act="quick_gelu", projection_dim=32)
SDXL_TEXT_2 = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   hidden_act="gelu", projection_dim=24)
SDXL_TIME_EMBED_DIM = 8


def _sdxl_unet(cross_attention_dim: int, time_ids: int) -> dict:
    return dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=SDXL_TIME_EMBED_DIM, transformer_layers_per_block=(1, 2),
                projection_class_embeddings_input_dim=time_ids * SDXL_TIME_EMBED_DIM + SDXL_TEXT_2["projection_dim"],
                cross_attention_dim=cross_attention_dim, norm_num_groups=32)


SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                layers_per_block=1, norm_num_groups=32, sample_size=32, scaling_factor=0.13025, force_upcast=True)

# The full-size SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0: text_encoder, text_encoder_2, unet and
# vae config.json, their non-default values). CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (with projection).
SDXL_BASE_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      hidden_act="quick_gelu", projection_dim=768)
SDXL_BASE_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                        hidden_act="gelu", projection_dim=1280)
SDXL_BASE_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, cross_attention_dim=2048,
    addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32)
SDXL_BASE_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                     layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
                     force_upcast=True)


def _configs(kind: str) -> dict:
    if kind in INPAINT_KINDS:
        cfg = _configs(INPAINT_KINDS[kind])
        latent = cfg["vae"]["latent_channels"]
        return {**cfg, "unet": {**cfg["unet"], "in_channels": 2 * latent + 1}, "inpaint": True}
    if kind == "sd1-tiny":
        return dict(
            text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      hidden_act="quick_gelu", projection_dim=32),
            unet=dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                      block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                      attention_head_dim=8, norm_num_groups=32),
            vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                     down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                     layers_per_block=1, norm_num_groups=32, sample_size=32, scaling_factor=0.18215),
            scheduler=SD1_SCHEDULER, pad_token=EOS,
        )
    if kind == "sd2-tiny":
        return dict(
            text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      hidden_act="gelu", projection_dim=64),
            unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                      block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                      attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
                      norm_num_groups=32),
            vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64),
                     down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                     layers_per_block=1, norm_num_groups=32, sample_size=32, scaling_factor=0.13025),
            scheduler=SD2_SCHEDULER, pad_token="!",
        )
    if kind in ("sdxl-tiny", "sdxl-turbo-tiny"):
        return dict(
            text=SDXL_TEXT, text_2=SDXL_TEXT_2, pad_token=EOS, pad_token_2="!",
            unet=_sdxl_unet(SDXL_TEXT["hidden_size"] + SDXL_TEXT_2["hidden_size"], time_ids=6), vae=SDXL_VAE,
            scheduler=SDXL_SCHEDULER if kind == "sdxl-tiny" else SDXL_TURBO_SCHEDULER,
            pipeline=dict(force_zeros_for_empty_prompt=True),
        )
    if kind == "sdxl-refiner-tiny":
        return dict(
            text_2=SDXL_TEXT_2, pad_token_2="!", unet=_sdxl_unet(SDXL_TEXT_2["hidden_size"], time_ids=5),
            vae=SDXL_VAE, scheduler=SDXL_SCHEDULER,
            pipeline=dict(requires_aesthetics_score=True, force_zeros_for_empty_prompt=False),
        )
    if kind == "sd-turbo-tiny":
        return {**_configs("sd2-tiny"), "scheduler": SD_TURBO_SCHEDULER}
    if kind == "lcm-tiny":
        sd1 = _configs("sd1-tiny")
        return {**sd1, "unet": {**sd1["unet"], "time_cond_proj_dim": 16}, "scheduler": LCM_SCHEDULER}
    if kind == "sd15":
        return dict(
            text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      hidden_act="quick_gelu", projection_dim=768),
            unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                      block_out_channels=(320, 640, 1280, 1280),
                      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                      cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
            vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                     layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215),
            scheduler=SD1_SCHEDULER, pad_token=EOS,
        )
    if kind == "sdxl":
        return dict(text=SDXL_BASE_TEXT, text_2=SDXL_BASE_TEXT_2, pad_token=EOS, pad_token_2="!",
                    unet=SDXL_BASE_UNET, vae=SDXL_BASE_VAE, scheduler=SDXL_SCHEDULER,
                    pipeline=dict(force_zeros_for_empty_prompt=True))
    raise SystemExit(f"unknown model kind {kind!r}; choose one of: {', '.join(KINDS)}")


def _text_encoder(cfg: dict, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                            pad_token_id=1, **cfg)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _pipeline(kind: str, cfg: dict, modules: dict, tok_dirs: dict):
    """The diffusers pipeline object whose save_pretrained writes the checkpoint of ``kind``."""
    import diffusers
    from transformers import CLIPTokenizer

    scheduler = getattr(diffusers, cfg["scheduler"]["_class_name"]).from_config(cfg["scheduler"])
    tokenizers = {name: CLIPTokenizer.from_pretrained(path) for name, path in tok_dirs.items()}
    parts = dict(vae=modules["vae"], unet=modules["unet"], scheduler=scheduler)
    if kind.startswith("sdxl"):
        cls = diffusers.StableDiffusionXLImg2ImgPipeline if kind == "sdxl-refiner-tiny" else \
            diffusers.StableDiffusionXLInpaintPipeline if cfg.get("inpaint") else diffusers.StableDiffusionXLPipeline
        return cls(text_encoder=modules.get("text_encoder"), text_encoder_2=modules["text_encoder_2"],
                   tokenizer=tokenizers.get("tokenizer"), tokenizer_2=tokenizers["tokenizer_2"], add_watermarker=False,
                   **parts, **cfg["pipeline"])
    cls = diffusers.LatentConsistencyModelPipeline if kind == "lcm-tiny" else \
        diffusers.StableDiffusionInpaintPipeline if cfg.get("inpaint") else diffusers.StableDiffusionPipeline
    return cls(text_encoder=modules["text_encoder"], tokenizer=tokenizers["tokenizer"], safety_checker=None,
               feature_extractor=None, requires_safety_checker=False, **parts)


def make_model(kind: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a random-weight checkpoint of ``kind`` to ``out_dir`` (written beside it, renamed into place)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg = _configs(kind)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    modules = {}
    if "text" in cfg:
        modules["text_encoder"] = _text_encoder(cfg["text"])
    if "text_2" in cfg:
        modules["text_encoder_2"] = _text_encoder(cfg["text_2"], with_projection=True)
    modules["unet"] = UNet2DConditionModel(**cfg["unet"]).eval()
    modules["vae"] = AutoencoderKL(**cfg["vae"]).eval()
    if kind not in BENCHMARK_KINDS:
        # Random init leaves conv_out/attention-out near zero in places; perturb every parameter a little so
        # every path carries signal and parity checks measure something.
        with torch.no_grad():
            for module in modules.values():
                for p in module.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
    pads = {"tokenizer": cfg.get("pad_token"), "tokenizer_2": cfg.get("pad_token_2")}
    pads = {name: pad for name, pad in pads.items() if pad is not None}
    for name, pad in pads.items():
        write_clip_tokenizer(tmp / name, pad_token=pad)
    pipe = _pipeline(kind, cfg, modules, {name: tmp / name for name in pads})
    pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
    # save_pretrained rewrites the tokenizer folders; keep the files exactly as released checkpoints ship them
    for name, pad in pads.items():
        shutil.rmtree(tmp / name)
        write_clip_tokenizer(tmp / name, pad_token=pad)
    # and the scheduler config as the original file (diffusers adds all defaults)
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg["scheduler"], indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _perturbed(module, seed: int, spread: float = 0.02):
    """``module`` with every parameter moved a little (zero-initialised convolutions too), so every path carries
    signal and parity checks measure something."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * spread)
    return module.eval()


def _save_beside(module, out_dir: str | os.PathLike) -> Path:
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    module.save_pretrained(tmp, safe_serialization=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def make_controlnet(base: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0,
                    embedding: tuple[int, ...] | None = None) -> Path:
    """A random ControlNet for the checkpoint at ``base`` (``ControlNetModel.from_unet`` of its UNet, weights
    copied then perturbed). ``embedding``: the conditioning embedding's channels; by default as many levels as
    downsample the control image by the base's VAE scale factor (16, 32, 96, 256 for a factor of 8, as
    released ControlNets)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    base = Path(base)
    vae = json.loads((base / "vae" / "config.json").read_text())
    levels = len(vae.get("block_out_channels", (0,) * 4))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    channels = embedding or (16, 32, 96, 256)[:levels]
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    # 0.05: enough that its residuals change the tiny models' pictures clearly (tests tell them from the plain path)
    return _save_beside(_perturbed(controlnet, seed, 0.05), out_dir)


def make_t2i_adapter(base: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A random T2I-Adapter for the checkpoint at ``base``, one feature per UNet down block at that block's width
    and where diffusers adds it: ``full_adapter`` (unshuffle by the VAE factor, then halving) for a UNet whose
    first block has cross-attention (SD1/SD2), else ``full_adapter_xl`` (unshuffle by twice the factor: SDXL's
    first block adds it after downsampling)."""
    import torch
    from diffusers import T2IAdapter

    base = Path(base)
    unet = json.loads((base / "unet" / "config.json").read_text())
    vae = json.loads((base / "vae" / "config.json").read_text())
    torch.manual_seed(seed)
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    xl = "CrossAttn" not in unet["down_block_types"][0]
    adapter = T2IAdapter(in_channels=vae.get("in_channels", 3), channels=list(unet["block_out_channels"]),
                         num_res_blocks=1, downscale_factor=factor * 2 if xl else factor,
                         adapter_type="full_adapter_xl" if xl else "full_adapter")
    return _save_beside(_perturbed(adapter, seed), out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=KINDS + CONTROL_KINDS)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", default=None, help="controlnet, t2i-adapter: the checkpoint folder it is made for")
    args = ap.parse_args(argv)
    if args.kind in CONTROL_KINDS:
        if args.base is None:
            ap.error(f"{args.kind} needs --base MODEL_DIR")
        make = make_controlnet if args.kind == "controlnet" else make_t2i_adapter
        path = make(args.base, args.out_dir, args.seed)
    else:
        path = make_model(args.kind, args.out_dir, args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
