"""Reading a diffusers-format Stable Diffusion checkpoint: what is there, what is supported, the model numbers.

Everything refused here is refused with one line naming what is missing or unsupported, before any heavy
work starts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdrt.errors import UserError
from sdrt.runtime.families import Family, family_class

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                       "LatentConsistencyModelPipeline", "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                       "StableDiffusionXLInpaintPipeline")
# SDXL's added time ids, in the order diffusers' _get_add_time_ids lists them
TIME_IDS = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width")
TIME_IDS_AESTHETIC = ("original_height", "original_width", "crop_top", "crop_left", "aesthetic_score")


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
    family: str                      # sdrt.runtime.families: "sd" (SD1/SD2, Turbo, LCM), "sdxl", "sdxl-refiner"
    text_configs: dict[str, dict]    # text encoder component -> its config
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    scheduler_config: dict[str, Any]

    @property
    def text_config(self) -> dict[str, Any]:
        """The first text encoder's config (the only one of SD1/SD2)."""
        return next(iter(self.text_configs.values()))

    @property
    def adapter(self) -> type[Family]:
        """The family's adapter (sdrt.runtime.families): its text encoders, UNet conditioning and numbers."""
        return family_class(self.family)

    @property
    def text_encoders(self) -> tuple[tuple[str, str], ...]:
        """(component, tokenizer folder) of each text encoder, in the order their outputs are concatenated."""
        return self.adapter.text_encoders

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
        family = cls._family(path, index)
        text_encoders = family_class(family).text_encoders
        folders = [f for pair in text_encoders for f in pair] + ["unet", "vae", "scheduler"]
        missing = [c for c in folders if not (path / c).is_dir()]
        if missing:
            raise UserError(f"{path}: component folder(s) missing: {', '.join(missing)}")
        for comp in [c for c, _ in text_encoders] + ["unet", "vae"]:
            check_weights(path / comp, allow_pickle)
        ckpt = cls(
            path=path,
            model_index=index,
            family=family,
            text_configs={c: _read_json(path / c / "config.json") for c, _ in text_encoders},
            unet_config=_read_json(path / "unet" / "config.json"),
            vae_config=_read_json(path / "vae" / "config.json"),
            scheduler_config=_read_json(path / "scheduler" / "scheduler_config.json"),
        )
        ckpt._refuse_unsupported_unet()
        return ckpt

    @staticmethod
    def _family(path: Path, index: dict[str, Any]) -> str:
        cls_name = index.get("_class_name", "")
        if cls_name and cls_name not in SUPPORTED_PIPELINES:
            raise UserError(
                f"{path}: pipeline class {cls_name!r} is not supported; supported: {', '.join(SUPPORTED_PIPELINES)}")

        def present(name: str) -> bool:  # model_index lists an absent component as [null, null]
            entry = index.get(name)
            return isinstance(entry, list) and any(entry)

        if not present("text_encoder_2"):
            return "sd"
        return "sdxl" if present("text_encoder") else "sdxl-refiner"

    def _refuse_unsupported_unet(self) -> None:
        u, v = self.unet_config, self.vae_config
        wanted = self.adapter.addition_embed_type
        if u.get("addition_embed_type") != wanted:
            raise UserError(
                f"{self.path}/unet: addition_embed_type={u.get('addition_embed_type')!r} with "
                f"{self.model_index.get('_class_name')}: supported is {wanted!r} (SDXL's text_time conditioning)")
        if v.get("latents_mean") is not None or v.get("latents_std") is not None:
            raise UserError(f"{self.path}/vae: latents_mean/latents_std (a normalized latent space) is not supported yet")
        latent = v.get("latent_channels", 4)
        if u.get("in_channels", 4) not in (latent, 2 * latent + 1):
            raise UserError(
                f"{self.path}/unet: in_channels={u.get('in_channels')} but the VAE has {latent} latent channels: "
                f"supported are {latent} (txt2img, img2img) and {2 * latent + 1} (inpainting: latents, mask and "
                "masked-image latents)")
        if u.get("class_embed_type") or u.get("num_class_embeds"):
            raise UserError(f"{self.path}/unet: class-conditioned UNets (upscalers, unCLIP) are not supported yet")
        if not isinstance(u.get("sample_size", 64), int):
            raise UserError(f"{self.path}/unet: non-square sample_size {u.get('sample_size')!r} is not supported yet")

    def config_sha256(self) -> str:
        """sha256 over the configs (pipeline index, text encoder, UNet, VAE, scheduler): the manifest records it as
        ``source.config_sha256``, and `sdrt bench --reference` compares it to tell the source checkpoint."""
        h = hashlib.sha256()
        for cfg in (self.model_index, *self.text_configs.values(), self.unet_config, self.vae_config,
                    self.scheduler_config):
            h.update(json.dumps(cfg, sort_keys=True).encode())
        return h.hexdigest()

    @property
    def latent_size_multiple(self) -> int:
        """The UNet's total downsampling factor."""
        return 2 ** (len(self.unet_config.get("block_out_channels", [320, 640, 1280, 1280])) - 1)

    # ---- the model's numbers -----------------------------------------------------------------------------
    def model_numbers(self, tokenizers: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Every number the runtime needs, read from the configs (never assumed).

        ``tokenizers``: tokenizer folder -> the numbers ``export_tokenizer`` returned for it.
        """
        u, v, s = self.unet_config, self.vae_config, self.scheduler_config
        vae_scale_factor = 2 ** (len(v.get("block_out_channels", [64])) - 1)
        sample_size = int(u.get("sample_size", 64))
        encoders = []
        for comp, tok_name in self.text_encoders:
            t, tok = self.text_configs[comp], tokenizers[tok_name]
            if tok["max_length"] > int(t.get("max_position_embeddings", 77)):
                raise UserError(
                    f"{self.path}/{tok_name}: model_max_length {tok['max_length']} exceeds {comp}'s "
                    f"max_position_embeddings {t.get('max_position_embeddings')}")
            encoders.append({"component": comp, "tokenizer": tok_name, "hidden_size": int(t["hidden_size"]),
                             "max_length": tok["max_length"], "pad_token": tok["pad_token"],
                             "pad_token_id": tok["pad_token_id"]})
        lengths = {e["max_length"] for e in encoders}
        if len(lengths) > 1:
            raise UserError(f"{self.path}: the tokenizers' model_max_length differ ({sorted(lengths)}); "
                            "their hidden states are concatenated, so they must be equal")
        hidden = sum(e["hidden_size"] for e in encoders)
        if u.get("cross_attention_dim", hidden) != hidden:
            raise UserError(
                f"{self.path}: text encoder hidden size {hidden} != unet cross_attention_dim {u.get('cross_attention_dim')}")
        first = encoders[0]
        numbers = {
            "latent_channels": int(v.get("latent_channels", 4)),
            # the latents' channels, or an inpainting UNet's 2 x latent + 1 (latents, mask, masked-image latents)
            "unet_in_channels": int(u.get("in_channels", 4)),
            "vae_scale_factor": vae_scale_factor,
            "scaling_factor": float(v.get("scaling_factor", 0.18215)),
            "shift_factor": None if v.get("shift_factor") is None else float(v["shift_factor"]),
            "sample_size": sample_size,
            "default_height": sample_size * vae_scale_factor,
            "default_width": sample_size * vae_scale_factor,
            # any latent size works (the UNet is traced with upsample_size; see steps._shapes), so images
            # need only be multiples of the VAE's factor, as in diffusers
            "size_multiple": vae_scale_factor,
            "image_channels": int(v.get("in_channels", 3)),
            "text_hidden_size": hidden,
            "text_max_length": first["max_length"],
            "pad_token": first["pad_token"],
            "pad_token_id": first["pad_token_id"],
            "prediction_type": s.get("prediction_type", "epsilon"),
            "scheduler_class": s.get("_class_name", ""),
            "family": self.family,
            "txt2img": self.adapter.txt2img,
            # diffusers' flag for a VAE that overflows in fp16 (SDXL's): TensorRT builds it in fp32
            "force_upcast": bool(v.get("force_upcast", True)),
            # an LCM-distilled UNet: guidance goes into this embedding (timestep_cond), not a second UNet pass
            "guidance_embedding_dim": (int(u["time_cond_proj_dim"]) if u.get("time_cond_proj_dim") else None),
        }
        if "time_ids" in self.adapter.unet_conditioning:
            numbers.update(self._sdxl_numbers(encoders))
        return numbers

    def _sdxl_numbers(self, encoders: list[dict]) -> dict[str, Any]:
        """SDXL: both encoders, the pooled embedding's width and the added time ids' layout."""
        u = self.unet_config
        pooled = self.text_configs["text_encoder_2"]
        projection = int(pooled.get("projection_dim", pooled["hidden_size"]))
        for e in encoders:
            e["output"] = "penultimate_hidden_state"  # SDXL reads hidden_states[-2], without the final norm
        encoders[-1]["pooled"] = "text_embeds"
        encoders[-1]["projection_dim"] = projection
        aesthetic = bool(self.model_index.get("requires_aesthetics_score", False))
        time_ids = TIME_IDS_AESTHETIC if aesthetic else TIME_IDS
        embed_dim = int(u.get("addition_time_embed_dim") or 0)
        expected = u.get("projection_class_embeddings_input_dim")
        if embed_dim * len(time_ids) + projection != expected:
            raise UserError(
                f"{self.path}/unet: projection_class_embeddings_input_dim={expected} but {len(time_ids)} time ids x "
                f"addition_time_embed_dim {embed_dim} + text_encoder_2 projection_dim {projection} = "
                f"{embed_dim * len(time_ids) + projection} (requires_aesthetics_score={aesthetic} in model_index.json)")
        return {
            "text_encoders": encoders,
            "pooled_dim": projection,
            "time_ids": list(time_ids),
            # None negative prompts become zeros instead of the encoded empty string (diffusers' flag)
            "force_zeros_for_empty_prompt": bool(self.model_index.get("force_zeros_for_empty_prompt", True)),
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
