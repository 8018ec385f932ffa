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

ControlNets and T2I-Adapters (``controlnet/NAME``; the manifest's ``controlnets`` record says which) and the UNet
graphs taking their outputs (``unet_control``, ``unet_adapter``) get the UNet's ranges:

* ``unet_control`` / ``unet_adapter`` take the UNet's batch (guided and unguided); a residual's or feature's
  ``latent_height_k`` / ``latent_width_k`` is the latent size halved k times, rounding up, as the UNet's down
  blocks halve it (sdrt.runtime.control.level_size), so at every latent size the ControlNet's outputs have the
  shapes ``unet_control`` takes.
* A ControlNet runs on the UNet's batch too: both halves under guidance, the conditional half alone in guess
  mode, the image batch unguided; the UNet's batch minimum (the image batch's) allows the last two. Its
  ``controlnet_cond`` is the control image, at pixel size (latent x vae_scale_factor: ``height``/``width``).
* A T2I-Adapter runs once per request on its one picture (batch 1, static too), before the denoising loop.
* A ControlNet's or T2I-Adapter's sizes are the request's rounded inward to multiples of its record's
  ``image_multiple`` (a T2I-Adapter's pixel unshuffle can want a larger one than the VAE's), the sizes the runtime
  lets it take; a range holding none is refused in one line.

Sizes must be multiples of the manifest's ``model.size_multiple``. Export records the VAE scale factor there
(8 for SD1.5), as diffusers asks: the UNet is traced to take every latent size (sdrt.export.steps._shapes),
so only the VAE's own downsampling constrains the image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from sdrt.errors import UserError
from sdrt.runtime.control import CONTROLNET, T2I_ADAPTER, UNET_ADAPTER, UNET_CONTROL, dim_level, level_size
from sdrt.runtime.engine_cache import describe_profile, is_static, profile_fits  # noqa: F401 (re-exported)

# How many times the largest image batch (UNet, its residual graphs, a ControlNet) or prompt batch (text encoder) a
# component may see; a ControlNet is told by its record's kind, not its component name.
GUIDED_BATCH_FACTOR = {"unet": 2, UNET_CONTROL: 2, UNET_ADAPTER: 2, CONTROLNET: 2, "text_encoder": 2}
ADAPTER_BATCH = 1   # a T2I-Adapter's: one picture per request (sdrt.runtime.pipeline.Pipeline._controls)
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


def _batch_ranges(component: str, req: ShapeRequest, kind: str | None = None) -> list[Range]:
    b, c = req.batch, req.chunks
    if component.startswith("text_encoder"):
        return [Range(1, b.opt * c.opt, GUIDED_BATCH_FACTOR["text_encoder"] * b.max * c.max)]
    if kind == T2I_ADAPTER:
        return [Range(ADAPTER_BATCH, ADAPTER_BATCH, ADAPTER_BATCH)]
    factor = GUIDED_BATCH_FACTOR.get(kind or component, 1)
    if factor == 1:
        return [b]
    if req.static:
        return [b, b.scaled(factor, factor, factor)]
    return [b.scaled(1, factor, factor)]


def _on_grid(r: Range, multiple: int, what: str, component: str) -> Range:
    """``r`` rounded inward to multiples of ``multiple`` (OPT rounded down, kept within); one line when none is left."""
    lo, hi = -(-r.min // multiple) * multiple, r.max // multiple * multiple
    if lo > hi:
        raise UserError(f"{component}: --{what} {r} holds no multiple of {multiple}, which its control image's size "
                        f"must be; give a range that does, or build the others with --components")
    return Range(lo, min(max(r.opt // multiple * multiple, lo), hi), hi)


def _latent_level(symbol: str, sizes: Mapping[str, Range]) -> Range | None:
    """``latent_height_k`` / ``latent_width_k``: the latent range halved k times, rounding up; None for another."""
    level = dim_level(symbol)
    if level is None:
        return None
    latent, k = sizes[level[0]], level[1]
    return Range(level_size(latent.min, k), level_size(latent.opt, k), level_size(latent.max, k))


def component_profiles(component: str, inputs: Iterable[Mapping[str, Any]], model: Mapping[str, Any],
                       req: ShapeRequest, control: Mapping[str, Any] | None = None
                       ) -> list[dict[str, dict[str, list[int]]]]:
    """The optimization profiles for one component: ``[{input_name: {"min", "opt", "max"}}]``.

    ``inputs`` are the manifest's input specs (name, dtype, shape with ints or symbol strings). ``control``: the
    manifest's ``controlnets`` record of a ``controlnet/NAME`` component (its kind and ``image_multiple``).
    """
    vsf = int(model["vae_scale_factor"])
    length = int(model["text_max_length"])
    height, width = req.height, req.width
    if control is not None:
        multiple = int(control.get("image_multiple", vsf))
        height, width = _on_grid(height, multiple, "height", component), _on_grid(width, multiple, "width", component)
    sizes = {
        "height": height, "width": width, "sequence": req.chunks.scaled(length, length, length),
        "latent_height": Range(height.min // vsf, height.opt // vsf, height.max // vsf),
        "latent_width": Range(width.min // vsf, width.opt // vsf, width.max // vsf),
    }
    profiles = []
    for batch in _batch_ranges(component, req, control.get("kind", CONTROLNET) if control is not None else None):
        symbols = dict(sizes, batch=batch)
        profile = {}
        for spec in inputs:
            dims = {"min": [], "opt": [], "max": []}
            for d in spec["shape"]:
                if isinstance(d, int) and d >= 0:
                    r = Range(d, d, d)
                elif isinstance(d, str) and d in symbols:
                    r = symbols[d]
                elif isinstance(d, str) and (level := _latent_level(d, sizes)) is not None:
                    r = level
                else:
                    raise UserError(
                        f"{component}: input {spec['name']!r} has dimension {d!r}; sdrt build knows "
                        f"{', '.join(sorted(symbols))}, latent_height_K, latent_width_K (re-export the model)")
                dims["min"].append(r.min)
                dims["opt"].append(r.opt)
                dims["max"].append(r.max)
            profile[spec["name"]] = dims
        profiles.append(profile)
    return profiles
