"""The engine directory's manifest, ``sdrt.json``: read, checked and (at export/build time) written.

The manifest is plain JSON so that any tool can read it. Layout (format_version 1)::

    {
      "format": "sdrt-engine", "format_version": 1,
      "source": {"path": str, "pipeline_class": str, "config_sha256": str,   # path: the folder or single file
                 "loras": [{"file", "sha256", "scale", "format"}],     # fused by `sdrt export --lora`
                 "single_file"?: {"file", "sha256", "family": "sd1" | "sd2" | "sdxl", "configs": str,
                                  "vae": {"file", "sha256"} | null,
                                  "prediction_type": {"value": str, "how": str}}},   # how it was told
      "model": {                      # every model number, read from the checkpoint's configs
        "latent_channels": int,       # the VAE's latent channels (what the UNet denoises and returns)
        "vae_scale_factor": int,      # 2 ** (len(vae.block_out_channels) - 1)
        "scaling_factor": float, "shift_factor": float | null,
        "sample_size": int,           # unet sample_size (latent pixels)
        "default_height": int, "default_width": int,   # sample_size * vae_scale_factor
        "size_multiple": int,         # heights/widths must be multiples of this; export writes vae_scale_factor
                                      # (the UNet graph takes every latent size, as diffusers does)
        "image_channels": int,        # vae in_channels / out_channels
        "text_hidden_size": int,      # the UNet's context width (SDXL: both encoders' widths added)
        "text_max_length": int,
        "pad_token": str, "pad_token_id": int,   # the first text encoder's (each SDXL one's: text_encoders)
        "prediction_type": str, "scheduler_class": str,
        # optional (absent in manifests older than SDXL support: the defaults shown)
        "family": "sd" | "sdxl" | "sdxl-refiner",   # "sd": SD1.x/SD2.x and their LCM and Turbo forms ("sd")
        "txt2img": bool,              # false: img2img only (the SDXL refiner) (true)
        "force_upcast": bool,         # the VAE overflows in fp16 (SDXL's): TensorRT builds it fp32 (true)
        "guidance_embedding_dim": int | null,   # LCM-distilled UNet: guidance is its timestep_cond input (null)
        "unet_in_channels": int,      # the UNet's input channels: latent_channels, or an inpainting UNet's
                                      # 2 x latent_channels + 1 (latents, mask, masked-image latents) (latent_channels)
        # SDXL only:
        "text_encoders": [{"component": "text_encoder" | "text_encoder_2", "tokenizer": folder,
                           "hidden_size": int, "max_length": int, "pad_token": str, "pad_token_id": int,
                           "output": "penultimate_hidden_state",       # hidden_states[-2], concatenated in order
                           "pooled"?: "text_embeds", "projection_dim"?: int}],   # the last one's pooled output
        "pooled_dim": int,            # the UNet's text_embeds width
        "time_ids": [str],            # the UNet's time_ids, in order: original_height, original_width, crop_top,
                                      # crop_left, then target_height, target_width (base) or aesthetic_score (refiner)
        "force_zeros_for_empty_prompt": bool   # no negative prompt: zeros for its embeddings, not the encoded ""
      },
      "tokenizer": {"max_length", "pad_token", "pad_token_id", "bos_token_id", "eos_token_id"},
      "tokenizer_2": {...},           # SDXL: the second tokenizer's (the refiner has only this one)
      "components": {
        "<name>": {"file": "unet/model.onnx", "data_file": "model.onnx.data" | null,
                   "sha256": str, "size_bytes": int,     # over model.onnx then its data file
                   "inputs": [{"name", "dtype", "shape"}], "outputs": [...],   # shape entries: int or symbol str
                                                           # (unet encoder_hidden_states: "sequence" =
                                                           # text_max_length * prompt chunks; an int before)
                   "parity": {"rel_l2": float, "max_abs": float, "inputs": {name: shape}},
                   "variants": {"cpu": {"file", "sha256", "size_bytes", "parity",   # ONNX Runtime CPU's graph,
                                        "min_onnxruntime"?: str, ...}},    # same weights file; unet: fused
                                                           # attention; vae_*: GroupNorm as LayerNormalization
                   "token_embedding": {"initializer": str, "shape": [vocab, hidden]},  # text_encoder: the table
                                                           # textual-inversion rows are added to (at run time)
                   "weight_map": {"file": "unet/weight_map.json", "sha256", "mapped": int, "unmapped": int,
                                  "unused": int}}
                                                           # text_encoder, unet: where each Linear/Conv2d weight
                                                           # went (sdrt.export.weight_map), for run-time LoRAs
        # optional components:
        "unet_deep": {..., "branch": int},     # `sdrt export --cache-branch B`: the UNet, also returning the
                                               # hidden state entering up-path layer B (output deep_feature)
        "unet_shallow": {..., "branch": int},  # the UNet's inputs + deep_feature -> out_sample, computing only
                                               # the layers around skip connections 0..B (sdrt.export.feature_cache)
        "vae_decoder_tiny": {..., "scaling_factor": float, "shift_factor": float, "source": str}
                                               # `sdrt export --tiny-vae DIR`: an AutoencoderTiny's decoder; the
                                               # runtime decodes latents / scaling_factor + shift_factor (its own)
        "controlnet/<NAME>": {...},            # `sdrt export --controlnet PATH:NAME`: a ControlNet (-> down_residual_i,
                                               # mid_residual) or a T2I-Adapter (-> adapter_feature_i)
        "unet_control": {..., "base": {...}},  # unet/control.onnx over unet/model.onnx.data: the UNet's inputs + a
                                               # ControlNet's residuals -> out_sample
        "unet_adapter": {..., "base": {...}}   # unet/adapter.onnx, the same with a T2I-Adapter's features
      },
      "controlnets": {"<NAME>": {"kind", "component", "unet", "residuals", "outputs", "image_input",
                                 "image_multiple", "source", "base", ...}},   # sdrt.runtime.control
      "feature_cache": {"branch": int, "deep": "unet_deep", "shallow": "unet_shallow",
                        "feature": "deep_feature"},   # present when the pair was exported
      "tools": {"sdrt", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "opset"},
      "engines": { "<component>": [ {"key", "precision", "profiles", "tensorrt_version", ...} ] }  # by `sdrt build`
    }
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdrt.errors import UserError
from sdrt.runtime.families import family_class
from sdrt.runtime.files import write_text_atomic

MANIFEST_NAME = "sdrt.json"
FORMAT = "sdrt-engine"
FORMAT_VERSION = 1
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
TINY_VAE = "vae_decoder_tiny"   # optional: an AutoencoderTiny's decoder (`sdrt export --tiny-vae`)
REQUIRED_COMPONENTS = ("unet", "vae_decoder")  # and each of the model's text encoders
VERIFY = ("none", "size", "sha256")  # how Manifest.load checks the files: not at all, sizes, full hashes
MODEL_KEYS = (
    "latent_channels", "vae_scale_factor", "scaling_factor", "shift_factor", "sample_size",
    "default_height", "default_width", "size_multiple", "image_channels", "text_hidden_size", "text_max_length",
    "pad_token", "pad_token_id", "prediction_type", "scheduler_class",
)

SDXL_MODEL_KEYS = ("text_encoders", "pooled_dim", "time_ids", "force_zeros_for_empty_prompt")
OPTIONAL_MODEL_KEYS = ("family", "txt2img", "force_upcast", "guidance_embedding_dim",
                       "unet_in_channels") + SDXL_MODEL_KEYS


@dataclass(frozen=True)
class ModelNumbers:
    """The model's numbers, as the checkpoint's configs give them."""

    latent_channels: int
    vae_scale_factor: int
    scaling_factor: float
    shift_factor: float | None
    sample_size: int
    default_height: int
    default_width: int
    size_multiple: int
    image_channels: int
    text_hidden_size: int
    text_max_length: int
    pad_token: str
    pad_token_id: int
    prediction_type: str
    scheduler_class: str
    family: str = "sd"
    txt2img: bool = True
    force_upcast: bool = True
    guidance_embedding_dim: int | None = None
    text_encoders: tuple[dict, ...] = ()
    pooled_dim: int | None = None
    time_ids: tuple[str, ...] = ()
    force_zeros_for_empty_prompt: bool = False
    unet_in_channels: int | None = None   # None (an older manifest): latent_channels

    @property
    def inpainting(self) -> bool:
        """A 9-channel inpainting UNet: it reads a mask and the masked image's latents beside the latents."""
        return self.unet_in_channels is not None and self.unet_in_channels != self.latent_channels

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelNumbers":
        missing = [k for k in MODEL_KEYS if k not in d]
        if missing:
            raise UserError(f"manifest 'model' section lacks {', '.join(missing)}")
        optional = {k: d[k] for k in OPTIONAL_MODEL_KEYS if k in d}
        family = family_class(optional.get("family"))
        lacking = [k for k in family.model_keys if k not in d]
        if lacking:
            raise UserError(f"manifest 'model' section of a {family.name} model lacks {', '.join(lacking)}")
        for key in ("text_encoders", "time_ids"):
            if key in optional:
                optional[key] = tuple(optional[key])
        return cls(**{k: d[k] for k in MODEL_KEYS}, **optional)

    @property
    def text_encoder_components(self) -> tuple[str, ...]:
        return family_class(self.family).text_components()


def sha256_files(paths: list[Path], chunk: int = 1 << 24) -> tuple[str, int]:
    """sha256 over the files' bytes in order, and their total size."""
    h = hashlib.sha256()
    size = 0
    for p in paths:
        with open(p, "rb") as f:
            while True:
                b = f.read(chunk)
                if not b:
                    break
                h.update(b)
                size += len(b)
    return h.hexdigest(), size


class Manifest:
    """A loaded, checked ``sdrt.json``."""

    def __init__(self, engine_dir: Path, data: dict[str, Any]):
        self.engine_dir = Path(engine_dir)
        self.data = data
        self.model = ModelNumbers.from_dict(data.get("model", {}))

    # ---- reading -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, engine_dir: str | os.PathLike, verify: str = "size") -> "Manifest":
        """Load and check an engine directory's manifest.

        ``verify``: "none", "size" (files present with the recorded sizes; cheap) or "sha256" (full hash).
        """
        if not isinstance(engine_dir, (str, os.PathLike)):
            raise UserError(f"engine directory {engine_dir!r}: must be a path (str or os.PathLike)")
        if verify not in VERIFY:
            raise UserError(f"verify {verify!r}: choose one of {', '.join(VERIFY)}")
        engine_dir = Path(engine_dir)
        if engine_dir.exists() and not engine_dir.is_dir():
            raise UserError(f"engine directory {str(engine_dir)!r} is a file; give the folder `sdrt export` wrote")
        if not engine_dir.is_dir():
            raise UserError(f"engine directory {str(engine_dir)!r} does not exist; make one with `sdrt export`")
        path = engine_dir / MANIFEST_NAME
        if not path.is_file():
            raise UserError(f"{str(engine_dir)!r} is not an engine directory: {MANIFEST_NAME} is missing")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: unreadable manifest ({e})") from None
        if data.get("format") != FORMAT:
            raise UserError(f"{path}: format is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{path}: format_version {data.get('format_version')!r} is not supported; "
                f"this sdrt reads version {FORMAT_VERSION} (re-export the model)")
        m = cls(engine_dir, data)
        comps = data.get("components", {})
        for name in REQUIRED_COMPONENTS + m.model.text_encoder_components:
            if name not in comps:
                raise UserError(f"{path}: component {name!r} is missing from the manifest")
        if verify != "none":
            for name in comps:
                m.verify_component(name, full=(verify == "sha256"))
        return m

    def has(self, component: str) -> bool:
        return component in self.data.get("components", {})

    def component(self, name: str) -> dict[str, Any]:
        try:
            return self.data["components"][name]
        except KeyError:
            raise UserError(
                f"component {name!r} is not in {self.engine_dir}; it has: "
                f"{', '.join(self.data.get('components', {}))}") from None

    def component_files(self, name: str, variant: str | None = None) -> list[Path]:
        """The graph file and its external-data file, of the component or of one of its variants."""
        c = self.component(name)
        entry = c["variants"][variant] if variant else c
        graph = self.engine_dir / entry["file"]
        files = [graph]
        if c.get("data_file"):  # variants share the component's weights file
            files.append(graph.parent / c["data_file"])
        return files

    def graph_path(self, name: str, variant: str | None = None) -> Path:
        """The graph to load: ``variant``'s when the component has it (e.g. "cpu"), else the portable one."""
        c = self.component(name)
        if variant and variant in c.get("variants", {}):
            return self.engine_dir / c["variants"][variant]["file"]
        return self.engine_dir / c["file"]

    def verify_component(self, name: str, full: bool = False) -> None:
        c = self.component(name)
        for variant, entry in [(None, c)] + list(c.get("variants", {}).items()):
            what = f"component {name!r}" + (f" ({variant} variant)" if variant else "")
            files = self.component_files(name, variant)
            for f in files:
                if not f.is_file():
                    raise UserError(f"{what}: {f} is missing (corrupt engine directory; re-export)")
            size = sum(f.stat().st_size for f in files)
            if size != entry.get("size_bytes", size):
                raise UserError(
                    f"{what}: files are {size} bytes, manifest says {entry['size_bytes']} (corrupt engine directory)")
            if full:
                digest, _ = sha256_files(files)
                if digest != entry.get("sha256"):
                    raise UserError(f"{what}: sha256 mismatch (corrupt or modified engine directory)")

    # ---- writing (export and build) -----------------------------------------------------------------
    def save(self) -> None:
        write_json_atomic(self.engine_dir / MANIFEST_NAME, self.data)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON beside the target (a temporary file with the usual mode, synced) and rename it into place."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")
