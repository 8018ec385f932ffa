"""Write Stable Diffusion checkpoints with random weights in the diffusers layout.

Real diffusers/transformers classes, the real CLIP vocabulary (tools/clip_vocab.py), safetensors weights.

* ``sd1-tiny``: SD1-style (quick_gelu CLIP, epsilon prediction, PNDM, pad <|endoftext|>), a 2-block VAE
  (scale factor 2) - small enough for unit tests.
* ``sd2-tiny``: SD2-style (gelu CLIP, v_prediction, linear projections, per-block attention head dims,
  upcast attention, pad "!", DDIM), a 3-block VAE (scale factor 4) with a non-default scaling_factor.
* ``sd15``: the full-size SD1.5 architecture (860M-parameter UNet) for benchmarks; never in tests.

    python -m tools.make_models sd1-tiny OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from tools.clip_vocab import EOS, write_clip_tokenizer

KINDS = ("sd1-tiny", "sd2-tiny", "sd15")

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


def _configs(kind: str) -> dict:
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
    raise SystemExit(f"unknown model kind {kind!r}; choose one of: {', '.join(KINDS)}")


def make_model(kind: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a random-weight checkpoint of ``kind`` to ``out_dir`` (written beside it, renamed into place)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = _configs(kind)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        **cfg["text"])
    text_encoder = CLIPTextModel(text_config).eval()
    unet = UNet2DConditionModel(**cfg["unet"]).eval()
    vae = AutoencoderKL(**cfg["vae"]).eval()
    if kind != "sd15":
        # Random init leaves conv_out/attention-out near zero in places; perturb every parameter a little so
        # every path carries signal and parity checks measure something.
        with torch.no_grad():
            for module in (text_encoder, unet, vae):
                for p in module.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
    tok_dir = tmp / "tokenizer"
    write_clip_tokenizer(tok_dir, pad_token=cfg["pad_token"])
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    from diffusers import DDIMScheduler, PNDMScheduler

    sched_cls = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler}[cfg["scheduler"]["_class_name"]]
    scheduler = sched_cls.from_config(cfg["scheduler"])
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # save_pretrained rewrites the tokenizer folder; keep the files exactly as released checkpoints ship them
    shutil.rmtree(tmp / "tokenizer")
    write_clip_tokenizer(tmp / "tokenizer", pad_token=cfg["pad_token"])
    # and the scheduler config as the original file (diffusers adds all defaults)
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg["scheduler"], indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = make_model(args.kind, args.out_dir, args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
