"""Optimization profiles: the min/opt/max input shapes a TensorRT engine is built for.

The user gives ranges over what they think in (image batch, image height and width in pixels); each
component's input shapes follow from the manifest's symbolic dims and model numbers:

* ``batch`` is the image batch for the VAE. Under classifier-free guidance the pipeline runs the UNet on the
  unconditional and conditional halves at once, so the UNet's batch range is (min, 2*opt, 2*max), which
  still accepts an unguided batch.
* A text encoder (SDXL's two alike) sees prompts plus negative prompts (one per prompt, not per image), each
  as its number of prompt chunks (sdrt.runtime.prompts), so its batch range is (1, opt * chunks opt,
  2 * max * chunks max), in static mode too: it runs once per request and its cost is small.
* ``sequence`` (the UNet's text tokens) is text_max_length times the prompt chunks, 1:1:3 by default: prompts
  of up to 225 tokens (SD1.5). Static mode builds OPT chunks only.
* Every other input with a ``batch`` dimension follows its component's batch: SDXL's UNet ``text_embeds``
  and ``time_ids`` and an LCM UNet's ``timestep_cond`` are per sample, like ``sample``; their other
  dimensions are fixed numbers from the manifest.
* ``height``/``width`` are pixels; ``latent_height``/``latent_width`` are pixels / vae_scale_factor.
* Static mode builds exact shapes (min = opt = max); the UNet then gets two profiles, batch N (unguided)
  and 2N (guided).

Sizes must be multiples of the manifest's ``model.size_multiple``. Export records the VAE scale factor there
(8 for SD1.5), as diffusers asks: the UNet is traced to take every latent size (sdrt.export.steps._shapes),
so only the VAE's own downsampling constrains the image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from sdrt.errors import UserError
from sdrt.runtime.engine_cache import describe_profile, is_static, profile_fits  # noqa: F401 (re-exported)

# How many times the largest image batch (UNet) or prompt batch (text encoder) a component may see.
GUIDED_BATCH_FACTOR = {"unet": 2, "text_encoder": 2}
DEFAULT_PROMPT_CHUNKS = (1, 1, 3)


@dataclass(frozen=True)
class Range:
    """An inclusive range of one dimension with the value TensorRT optimizes for."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not (self.min <= self.opt <= self.max):
            raise UserError(f"range {self}: need MIN <= OPT <= MAX")

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    @property
    def static(self) -> bool:
        return self.min == self.opt == self.max

    def scaled(self, lo: int, opt: int, hi: int) -> "Range":
        return Range(self.min * lo, self.opt * opt, self.max * hi)


def parse_range(text: str, what: str) -> Range:
    """Parse ``"MIN:OPT:MAX"`` or a single ``"N"`` (= N:N:N) of positive integers."""
    parts = str(text).strip().split(":")
    if len(parts) not in (1, 3):
        raise UserError(f"--{what} {text!r}: expected MIN:OPT:MAX (e.g. 1:1:4) or one number")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"--{what} {text!r}: expected integers, as MIN:OPT:MAX (e.g. 1:1:4)") from None
    if any(v <= 0 for v in values):
        raise UserError(f"--{what} {text!r}: values must be positive")
    if len(values) == 1:
        values *= 3
    lo, opt, hi = values
    if not lo <= opt <= hi:
        raise UserError(f"--{what} {text!r}: need MIN <= OPT <= MAX")
    return Range(lo, opt, hi)


def as_range(value: Range | tuple[int, int, int] | int | str, what: str) -> Range:
    if isinstance(value, Range):
        return value
    if isinstance(value, str):
        return parse_range(value, what)
    if isinstance(value, int):
        return parse_range(str(value), what)
    return parse_range(":".join(str(v) for v in value), what)


def size_multiple(model: Mapping[str, Any]) -> int:
    """What heights and widths must be multiples of (see the module docstring; Manifest.load requires the key)."""
    return int(model["size_multiple"])


def default_size_range(default: int, multiple: int) -> Range:
    """Half to twice the model's default size, on the size grid (SD1.5: 256:512:1024)."""
    lo = max(multiple, (default // 2) // multiple * multiple)
    hi = max(default, (default * 2) // multiple * multiple)
    return Range(lo, default, hi)


def check_size_range(r: Range, what: str, multiple: int, vae_scale_factor: int) -> None:
    bad = [v for v in (r.min, r.opt, r.max) if v % multiple]
    if bad:
        why = (f"the VAE scale factor: one latent per {multiple}x{multiple} pixels" if multiple == vae_scale_factor
               else "the manifest's model.size_multiple")
        raise UserError(f"--{what} {r}: {bad[0]} is not a multiple of {multiple} ({why})")


@dataclass(frozen=True)
class ShapeRequest:
    """What the user asked for, in image terms."""

    batch: Range
    height: Range
    width: Range
    static: bool = False
    chunks: Range = Range(*DEFAULT_PROMPT_CHUNKS)


def make_request(model: Mapping[str, Any], batch=(1, 1, 4), height=None, width=None,
                 static: bool = False, chunks=DEFAULT_PROMPT_CHUNKS) -> ShapeRequest:
    """Turn CLI-level values into checked ranges; static mode collapses each range to its OPT value."""
    multiple = size_multiple(model)
    b = as_range(batch, "batch")
    h = as_range(height, "height") if height is not None else default_size_range(int(model["default_height"]), multiple)
    w = as_range(width, "width") if width is not None else default_size_range(int(model["default_width"]), multiple)
    c = as_range(chunks, "prompt-chunks")
    if static:
        b, h, w, c = (Range(r.opt, r.opt, r.opt) for r in (b, h, w, c))
    check_size_range(h, "height", multiple, int(model["vae_scale_factor"]))
    check_size_range(w, "width", multiple, int(model["vae_scale_factor"]))
    return ShapeRequest(b, h, w, static, c)


def _batch_ranges(component: str, req: ShapeRequest) -> list[Range]:
    b, c = req.batch, req.chunks
    if component.startswith("text_encoder"):
        return [Range(1, b.opt * c.opt, GUIDED_BATCH_FACTOR["text_encoder"] * b.max * c.max)]
    factor = GUIDED_BATCH_FACTOR.get(component, 1)
    if factor == 1:
        return [b]
    if req.static:
        return [b, b.scaled(factor, factor, factor)]
    return [b.scaled(1, factor, factor)]


def component_profiles(component: str, inputs: Iterable[Mapping[str, Any]], model: Mapping[str, Any],
                       req: ShapeRequest) -> list[dict[str, dict[str, list[int]]]]:
    """The optimization profiles for one component: ``[{input_name: {"min", "opt", "max"}}]``.

    ``inputs`` are the manifest's input specs (name, dtype, shape with ints or symbol strings).
    """
    vsf = int(model["vae_scale_factor"])
    length = int(model["text_max_length"])
    sizes = {
        "height": req.height, "width": req.width, "sequence": req.chunks.scaled(length, length, length),
        "latent_height": Range(req.height.min // vsf, req.height.opt // vsf, req.height.max // vsf),
        "latent_width": Range(req.width.min // vsf, req.width.opt // vsf, req.width.max // vsf),
    }
    profiles = []
    for batch in _batch_ranges(component, req):
        symbols = dict(sizes, batch=batch)
        profile = {}
        for spec in inputs:
            dims = {"min": [], "opt": [], "max": []}
            for d in spec["shape"]:
                if isinstance(d, int) and d >= 0:
                    r = Range(d, d, d)
                elif isinstance(d, str) and d in symbols:
                    r = symbols[d]
                else:
                    raise UserError(
                        f"{component}: input {spec['name']!r} has dimension {d!r}; sdrt build knows "
                        f"{', '.join(sorted(symbols))} (re-export the model)")
                dims["min"].append(r.min)
                dims["opt"].append(r.opt)
                dims["max"].append(r.max)
            profile[spec["name"]] = dims
        profiles.append(profile)
    return profiles
