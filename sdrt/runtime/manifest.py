"""The engine directory's manifest, ``sdrt.json``: read, checked and (at export/build time) written.

The manifest is plain JSON so that any tool can read it. Layout (format_version 1)::

    {
      "format": "sdrt-engine", "format_version": 1,
      "source": {"path": str, "pipeline_class": str, "config_sha256": str,   # path: the folder or single file
                 "loras": [{"file", "sha256", "scale", "format"}],     # fused by `sdrt export --lora`
                 "single_file"?: {"file", "sha256", "family": "sd1" | "sd2", "configs": str,
                                  "vae": {"file", "sha256"} | null,
                                  "prediction_type": {"value": str, "how": str}}},   # how it was told
      "model": {                      # every model number, read from the checkpoint's configs
        "latent_channels": int,       # unet in_channels == vae latent_channels
        "vae_scale_factor": int,      # 2 ** (len(vae.block_out_channels) - 1)
        "scaling_factor": float, "shift_factor": float | null,
        "sample_size": int,           # unet sample_size (latent pixels)
        "default_height": int, "default_width": int,   # sample_size * vae_scale_factor
        "size_multiple": int,         # heights/widths must be multiples of this: vae_scale_factor * 2**(unet downsamples)
        "image_channels": int,        # vae in_channels / out_channels
        "text_hidden_size": int, "text_max_length": int,
        "pad_token": str, "pad_token_id": int,
        "prediction_type": str, "scheduler_class": str
      },
      "components": {
        "<name>": {"file": "unet/model.onnx", "data_file": "model.onnx.data" | null,
                   "sha256": str, "size_bytes": int,     # over model.onnx then its data file
                   "inputs": [{"name", "dtype", "shape"}], "outputs": [...],   # shape entries: int or symbol str
                   "parity": {"rel_l2": float, "max_abs": float, "inputs": {name: shape}},
                   "variants": {"cpu": {"file", "sha256", "size_bytes", "parity",   # ONNX Runtime CPU's graph,
                                        "min_onnxruntime"?: str, ...}},    # same weights file; unet: fused
                                                           # attention; vae_*: GroupNorm as LayerNormalization
                   "weight_map": {"file": "unet/weight_map.json", "sha256", "mapped": int, "unmapped": int}}
                                                           # text_encoder, unet: where each Linear/Conv2d weight
                                                           # went (sdrt.export.weight_map), for run-time LoRAs
      },
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

MANIFEST_NAME = "sdrt.json"
FORMAT = "sdrt-engine"
FORMAT_VERSION = 1
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
REQUIRED_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
MODEL_KEYS = (
    "latent_channels", "vae_scale_factor", "scaling_factor", "shift_factor", "sample_size",
    "default_height", "default_width", "size_multiple", "image_channels", "text_hidden_size", "text_max_length",
    "pad_token", "pad_token_id", "prediction_type", "scheduler_class",
)


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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelNumbers":
        missing = [k for k in MODEL_KEYS if k not in d]
        if missing:
            raise UserError(f"manifest 'model' section lacks {', '.join(missing)}")
        return cls(**{k: d[k] for k in MODEL_KEYS})


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
        engine_dir = Path(engine_dir)
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
        for name in REQUIRED_COMPONENTS:
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
    """Write JSON beside the target (a unique temporary file, synced) and rename it into place."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write text beside the target (a unique temporary file, synced) and rename it into place."""
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file owner-only; give it the mode a plain open() would (or the replaced file's)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
