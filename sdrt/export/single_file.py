"""Single-file checkpoints: one ``.safetensors`` in the original (LDM) layout, as community fine-tunes ship.

The family is read from the file's header (keys and shapes; no tensor is read): SD1.x has CLIP ViT-L under
``cond_stage_model.transformer.``, SD2.x OpenCLIP ViT-H under ``cond_stage_model.model.``, SDXL (base) CLIP ViT-L
under ``conditioner.embedders.0.transformer.`` and OpenCLIP ViT-bigG under ``conditioner.embedders.1.model.``; all
have the UNet under ``model.diffusion_model.`` and usually the VAE under ``first_stage_model.``. The SDXL
refiner (one OpenCLIP encoder at ``conditioner.embedders.0.model.``), inpainting and other UNet inputs, and
layouts of other kinds are refused naming what was found.

The weights are converted by diffusers' own ``from_single_file`` against configs sdrt ships
(``configs/sd1``, ``configs/sd2``, ``configs/sdxl``: diffusers-format JSON, the tokenizer's files, the CLIP vocabulary derived from
the shipped merge list), so nothing is fetched from a hub; ``--config DIR`` names other configs (a diffusers
folder: its JSON and tokenizer are used, not its weights). The converted model is written as a diffusers folder
in the export's scratch space and exported from there like any checkpoint folder.

SD2's v-prediction and epsilon checkpoints have the same keys. In order: ``--prediction-type``; the empty
``v_pred`` tensor ComfyUI writes into v-prediction files; for SD1, epsilon; for SD2, AUTOMATIC1111's test
(the UNet at t=999 on a constant input and context: ``mean(out - x) < -1`` means v-prediction). The manifest
records the value and which of these gave it. Shipped SD2 configs default to 768 px for v-prediction (SD 2.x
768-v) and 512 px for epsilon (SD 2.x base).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sdrt.errors import UserError
from sdrt.runtime.safetensors_file import SafetensorsFile

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
PREDICTION_TYPES = ("epsilon", "v_prediction")
UNET, VAE = "model.diffusion_model.", "first_stage_model."
TEXT = {"sd1": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "sd2": "cond_stage_model.model.token_embedding.weight",
        "sdxl": "conditioner.embedders.1.model.token_embedding.weight"}
SDXL_TEXT_1 = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
SDXL_REFINER_TEXT = "conditioner.embedders.0.model.token_embedding.weight"
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
CONFIG_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "scheduler/scheduler_config.json")
TOKENIZERS = {"sd1": ("tokenizer",), "sd2": ("tokenizer",), "sdxl": ("tokenizer", "tokenizer_2")}
SD2_BASE_SAMPLE_SIZE = 64  # SD 2.x base (epsilon) is a 512 px model; the shipped SD2 config is 768-v's


@dataclass
class SingleFile:
    path: Path
    family: str                          # "sd1" | "sd2" | "sdxl"
    shapes: dict[str, tuple[int, ...]]

    @property
    def unet_in_channels(self) -> int:
        """The UNet's input channels, read from conv_in (an inpainting UNet's: 9)."""
        return self.shapes[UNET + "input_blocks.0.0.weight"][1]

    @property
    def has_vae(self) -> bool:
        return any(k.startswith(VAE) for k in self.shapes)


def _sample(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} keys)" if len(keys) > n else "")


def inspect_single_file(path: str | Path) -> SingleFile:
    """Read the header and tell the family, refusing what sdrt does not export (one line naming what was found)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{path}: a pickle-based checkpoint ({path.suffix}), which can run arbitrary code when read; "
                        "single-file checkpoints must be .safetensors")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path}: a single-file checkpoint must be a .safetensors file (or give a diffusers folder)")
    header = SafetensorsFile(path)
    shapes = {k: header.shape(k) for k in header.keys()}
    if SDXL_REFINER_TEXT in shapes:
        raise UserError(f"{path}: an SDXL refiner checkpoint (one OpenCLIP encoder at conditioner.embedders.0.model), "
                        "which sdrt does not export from a single file; export the refiner's diffusers folder")
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None:
        raise UserError(f"{path}: not an original-layout Stable Diffusion checkpoint (no "
                        f"{UNET}input_blocks.0.0.weight; found {_sample(shapes)})")
    # the latents' channels are what the UNet returns (its conv_out); an inpainting UNet also reads a mask and
    # the masked image's latents: 2 x latent + 1
    latent = (shapes.get(UNET + "out.2.weight") or (conv_in[1],))[0]
    if len(conv_in) == 4 and conv_in[1] not in (latent, 2 * latent + 1):
        raise UserError(f"{path}: a UNet that takes {conv_in[1]} input channels, which sdrt does not export; "
                        f"supported: {latent} (txt2img, img2img) and {2 * latent + 1} (inpainting)")
    found = [f for f, key in TEXT.items() if key in shapes and (f != "sdxl" or SDXL_TEXT_1 in shapes)]
    if len(found) != 1:
        raise UserError(f"{path}: no text encoder sdrt knows (expected {TEXT['sd1']} for SD1.x, {TEXT['sd2']} "
                        f"for SD2.x or {SDXL_TEXT_1} and {TEXT['sdxl']} for SDXL; found "
                        f"{_sample(k for k in shapes if k.startswith(('cond_stage_model.', 'conditioner.')))})")
    family = found[0]
    if family != "sdxl" and any(k.startswith(UNET + "label_emb.") for k in shapes):
        raise UserError(f"{path}: a class-conditioned UNet (label_emb: an upscaler or unCLIP), which sdrt does not "
                        "export")
    context = next((s[1] for k, s in shapes.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    hidden = shapes[TEXT[family]][1] + (shapes[SDXL_TEXT_1][1] if family == "sdxl" else 0)
    if context is not None and context != hidden:
        raise UserError(f"{path}: the UNet's cross-attention takes {context} features but the text encoder gives "
                        f"{hidden}; not a checkpoint sdrt knows")
    return SingleFile(path, family, shapes)


def convert_single_file(sf: SingleFile, out_dir: Path, *, vae: str | Path | None = None,
                        prediction_type: str | None = None, config_dir: str | Path | None = None,
                        log: Callable[[str], None] = print) -> dict:
    """Convert ``sf`` with diffusers' ``from_single_file`` into a diffusers folder ``out_dir``; returns what the
    manifest records of it (under source.single_file)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline

    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise UserError(f"--prediction-type {prediction_type!r}: choose {' or '.join(PREDICTION_TYPES)}")
    if vae is None and not sf.has_vae:
        raise UserError(f"{sf.path}: has no VAE ({VAE}* keys); pass one with --vae FILE")
    configs = out_dir.parent / f"{out_dir.name}.configs"
    _write_configs(sf.family, Path(config_dir) if config_dir else None, configs)
    try:
        unet_config = configs / "unet" / "config.json"
        unet = json.loads(unet_config.read_text())
        if sf.unet_in_channels != unet.get("in_channels", 4):   # an inpainting UNet: the configs say so first
            unet_config.write_text(json.dumps(dict(unet, in_channels=sf.unet_in_channels), indent=2))
        prediction, how = _declared_prediction(sf, prediction_type)
        if prediction is not None:
            _set_prediction(configs, prediction)
        kwargs = {"config": str(configs), "local_files_only": True, "torch_dtype": torch.float32}
        extra = {}
        if vae is not None:
            extra["vae"] = AutoencoderKL.from_single_file(str(inspect_vae_file(vae)), subfolder="vae", **kwargs)
        try:
            if sf.family == "sdxl":
                pipe = StableDiffusionXLPipeline.from_single_file(str(sf.path), **kwargs, **extra)
            else:
                pipe = StableDiffusionPipeline.from_single_file(str(sf.path), safety_checker=None,
                                                                requires_safety_checker=False, **kwargs, **extra)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise UserError(f"{sf.path}: diffusers could not convert it with the {FAMILY_NAMES[sf.family]} configs "
                            f"({str(e).splitlines()[0][:300]}); pass the model's own with --config DIR") from None
        if prediction is None:  # SD2 without a declaration: ask the weights
            is_v, score = v_prediction_test(pipe.unet)
            prediction = "v_prediction" if is_v else "epsilon"
            how = f"weights: AUTOMATIC1111's test, mean(UNet(x=0.5, t=999) - x) = {score:.3f} ({'<' if is_v else '>='} -1)"
            _set_prediction(configs, prediction)
        if config_dir is None and sf.family == "sd2" and prediction == "epsilon":
            pipe.unet.register_to_config(sample_size=SD2_BASE_SAMPLE_SIZE)  # SD 2.x base: 512 px
        log(f"single file: {FAMILY_NAMES[sf.family]}, prediction type {prediction} ({how})")
        pipe.save_pretrained(out_dir, safe_serialization=True)
        del pipe, extra
        # keep the configs' own tokenizer and scheduler files (save_pretrained rewrites them with every default)
        for sub in (*TOKENIZERS[sf.family], "scheduler"):
            shutil.rmtree(out_dir / sub, ignore_errors=True)
            shutil.copytree(configs / sub, out_dir / sub)
    finally:
        shutil.rmtree(configs, ignore_errors=True)
    from sdrt.runtime.manifest import sha256_files

    return {"file": str(sf.path.resolve()), "sha256": sha256_files([sf.path])[0], "family": sf.family,
            "configs": str(Path(config_dir).resolve()) if config_dir else f"sdrt:{sf.family}",
            "vae": None if vae is None else {"file": str(Path(vae).resolve()), "sha256": sha256_files([Path(vae)])[0]},
            "prediction_type": {"value": prediction, "how": how}}


def inspect_vae_file(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"--vae {path}: must be a .safetensors file")
    keys = SafetensorsFile(path).keys()
    if not any(k.startswith(("encoder.", "decoder.", VAE)) for k in keys):
        raise UserError(f"--vae {path}: not a VAE (expected encoder.*/decoder.* keys; found {_sample(keys)})")
    return path


def _declared_prediction(sf: SingleFile, prediction_type: str | None) -> tuple[str | None, str]:
    if prediction_type is not None:
        return prediction_type, "--prediction-type"
    if "v_pred" in sf.shapes:
        return "v_prediction", "the checkpoint's v_pred key"
    if sf.family == "sd1":
        return "epsilon", "SD1.x predicts the noise"
    if sf.family == "sdxl":
        return "epsilon", "SDXL predicts the noise"
    return None, ""


def v_prediction_test(unet) -> tuple[bool, float]:
    """AUTOMATIC1111's ``is_using_v_parameterization_for_sd2``: a v-prediction UNet at t=999 on x=0.5 everywhere
    (context 0.5 too) answers about -x0, so mean(out - x) falls below -1; an epsilon UNet answers noise."""
    import torch

    c = unet.config
    with torch.no_grad():
        x = torch.full((1, c.in_channels, 8, 8), 0.5)
        context = torch.full((1, 2, c.cross_attention_dim), 0.5)
        out = unet(x, torch.tensor([999.0]), context).sample
    score = float((out - x).mean())
    return score < -1, score


def _write_configs(family: str, config_dir: Path | None, out: Path) -> None:
    """The configs diffusers converts with: sdrt's for the family (with the CLIP vocabulary), or ``config_dir``'s."""
    from sdrt.export.clip_vocab import shipped_merges, write_vocab_files

    shutil.rmtree(out, ignore_errors=True)
    tokenizers = TOKENIZERS[family]
    if config_dir is None:
        shutil.copytree(CONFIG_ROOT / family, out)
        for tok in tokenizers:
            write_vocab_files(out / tok, shipped_merges())
        return
    files = CONFIG_FILES + (("text_encoder_2/config.json",) if family == "sdxl" else ())
    missing = [f for f in files if not (config_dir / f).is_file()] + \
        [f"{t}/" for t in tokenizers if not (config_dir / t).is_dir()]
    if missing:
        raise UserError(f"--config {config_dir}: not a diffusers {FAMILY_NAMES[family]} checkpoint folder (missing "
                        f"{', '.join(missing)})")
    for f in files:
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(config_dir / f, out / f)
    for tok in tokenizers:
        shutil.copytree(config_dir / tok, out / tok)


def _set_prediction(configs: Path, prediction: str) -> None:
    path = configs / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    cfg["prediction_type"] = prediction
    path.write_text(json.dumps(cfg, indent=2) + "\n")
