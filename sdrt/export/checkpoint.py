"""Reading a diffusers-format Stable Diffusion checkpoint: what is there, what is supported, the model numbers.

Everything refused here is refused with one line naming what is missing or unsupported, before any heavy
work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdrt.errors import UserError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
WEIGHT_COMPONENTS = ("text_encoder", "unet", "vae")
REQUIRED_FOLDERS = ("text_encoder", "unet", "vae", "tokenizer", "scheduler")
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None


@dataclass
class Checkpoint:
    """A checked checkpoint folder and its configs."""

    path: Path
    model_index: dict[str, Any]
    text_config: dict[str, Any]
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    tokenizer_config: dict[str, Any]

    @classmethod
    def open(cls, model_dir: str | Path, allow_pickle: bool = False) -> "Checkpoint":
        path = Path(model_dir)
        if not path.is_dir():
            raise UserError(f"model directory {str(path)!r} does not exist")
        index_path = path / "model_index.json"
        if not index_path.is_file():
            raise UserError(
                f"{str(path)!r} is not a diffusers checkpoint: model_index.json is missing "
                "(a single-file checkpoint is given as the .safetensors file itself)")
        index = _read_json(index_path)
        cls._refuse_unsupported(path, index)
        missing = [c for c in REQUIRED_FOLDERS if not (path / c).is_dir()]
        if missing:
            raise UserError(f"{path}: component folder(s) missing: {', '.join(missing)}")
        for comp in WEIGHT_COMPONENTS:
            check_weights(path / comp, allow_pickle)
        sched_path = path / "scheduler" / "scheduler_config.json"
        tok_cfg_path = path / "tokenizer" / "tokenizer_config.json"
        ckpt = cls(
            path=path,
            model_index=index,
            text_config=_read_json(path / "text_encoder" / "config.json"),
            unet_config=_read_json(path / "unet" / "config.json"),
            vae_config=_read_json(path / "vae" / "config.json"),
            scheduler_config=_read_json(sched_path),
            tokenizer_config=_read_json(tok_cfg_path) if tok_cfg_path.is_file() else {},
        )
        ckpt._refuse_unsupported_unet()
        return ckpt

    @staticmethod
    def _refuse_unsupported(path: Path, index: dict[str, Any]) -> None:
        cls_name = index.get("_class_name", "")
        if "text_encoder_2" in index or "XL" in cls_name:
            raise UserError(
                f"{path}: {cls_name or 'this pipeline'} has a second text encoder (SDXL), which is not supported yet; "
                "supported: SD1.x and SD2.x (StableDiffusionPipeline)")
        if cls_name and cls_name not in SUPPORTED_PIPELINES:
            raise UserError(
                f"{path}: pipeline class {cls_name!r} is not supported; supported: {', '.join(SUPPORTED_PIPELINES)}")

    def _refuse_unsupported_unet(self) -> None:
        u, v = self.unet_config, self.vae_config
        if u.get("addition_embed_type"):
            raise UserError(
                f"{self.path}/unet: addition_embed_type={u['addition_embed_type']!r} (SDXL-style conditioning) is not supported yet")
        if u.get("time_cond_proj_dim"):
            raise UserError(f"{self.path}/unet: time_cond_proj_dim (guidance-distilled UNet) is not supported yet")
        latent = v.get("latent_channels", 4)
        if u.get("in_channels", 4) != latent:
            raise UserError(
                f"{self.path}/unet: in_channels={u.get('in_channels')} but the VAE has {latent} latent channels "
                "(inpainting UNets are not supported yet)")
        if u.get("class_embed_type") or u.get("num_class_embeds"):
            raise UserError(f"{self.path}/unet: class-conditioned UNets (upscalers, unCLIP) are not supported yet")
        if not isinstance(u.get("sample_size", 64), int):
            raise UserError(f"{self.path}/unet: non-square sample_size {u.get('sample_size')!r} is not supported yet")

    @property
    def latent_size_multiple(self) -> int:
        """The UNet's total downsampling factor."""
        return 2 ** (len(self.unet_config.get("block_out_channels", [320, 640, 1280, 1280])) - 1)

    # ---- the model's numbers -----------------------------------------------------------------------------
    def model_numbers(self, tokenizer: dict[str, Any]) -> dict[str, Any]:
        """Every number the runtime needs, read from the configs (never assumed)."""
        u, v, t, s = self.unet_config, self.vae_config, self.text_config, self.scheduler_config
        vae_scale_factor = 2 ** (len(v.get("block_out_channels", [64])) - 1)
        sample_size = int(u.get("sample_size", 64))
        hidden = int(t["hidden_size"])
        if u.get("cross_attention_dim", hidden) != hidden:
            raise UserError(
                f"{self.path}: text encoder hidden_size {hidden} != unet cross_attention_dim {u.get('cross_attention_dim')}")
        max_length = int(tokenizer["max_length"])
        if max_length > int(t.get("max_position_embeddings", 77)):
            raise UserError(
                f"{self.path}: tokenizer model_max_length {max_length} exceeds the text encoder's "
                f"max_position_embeddings {t.get('max_position_embeddings')}")
        return {
            "latent_channels": int(v.get("latent_channels", 4)),
            "vae_scale_factor": vae_scale_factor,
            "scaling_factor": float(v.get("scaling_factor", 0.18215)),
            "shift_factor": None if v.get("shift_factor") is None else float(v["shift_factor"]),
            "sample_size": sample_size,
            "default_height": sample_size * vae_scale_factor,
            "default_width": sample_size * vae_scale_factor,
            # any latent size works (the UNet is traced with upsample_size; see exporter._shapes), so images
            # need only be multiples of the VAE's factor, as in diffusers
            "size_multiple": vae_scale_factor,
            "image_channels": int(v.get("in_channels", 3)),
            "text_hidden_size": hidden,
            "text_max_length": max_length,
            "pad_token": tokenizer["pad_token"],
            "pad_token_id": int(tokenizer["pad_token_id"]),
            "prediction_type": s.get("prediction_type", "epsilon"),
            "scheduler_class": s.get("_class_name", ""),
        }


def check_weights(folder: Path, allow_pickle: bool) -> None:
    """A component's weights must be safetensors, unless pickle checkpoints are explicitly allowed."""
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if not pickles:
        raise UserError(f"{folder}: no weights found (expected *.safetensors)")
    if not allow_pickle:
        raise UserError(
            f"{folder}: weights are pickle-based ({', '.join(sorted(pickles))}), which can run arbitrary code; "
            "convert them to safetensors, or pass --allow-pickle if you trust the source")
