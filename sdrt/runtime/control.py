"""ControlNets and T2I-Adapters at run time, without torch: the names the engine directory gives them, the
control image as diffusers prepares it, a Canny preprocessor, the per-step keep flags of a control-guidance
window, guess mode's scales, and the one-line checks.

What `sdrt export --controlnet DIR[:NAME]` writes (sdrt.export.controlnet), in the manifest::

    "components": {
      "controlnet/NAME": {... inputs: sample, timestep, encoder_hidden_states, controlnet_cond [, text_embeds,
                          time_ids]; outputs: down_residual_0..N-1, mid_residual}        # a ControlNet
      "controlnet/NAME": {... inputs: controlnet_cond; outputs: adapter_feature_0..K-1}   # a T2I-Adapter
      "unet_control": {... the UNet's inputs + down_residual_0..N-1, mid_residual -> out_sample, "base": {...}}
      "unet_adapter": {... the UNet's inputs + adapter_feature_0..K-1 -> out_sample, "base": {...}}
    },
    "controlnets": {"NAME": {"kind": "controlnet" | "t2i_adapter", "component": "controlnet/NAME",
                             "unet": "unet_control" | "unet_adapter",   # the UNet graph that takes its outputs
                             "residuals": [names, in the order the UNet graph takes them],
                             "image_input": "controlnet_cond", "image_multiple": int,  # sizes the image must divide
                             "global_pool_conditions": bool,    # ControlNet: residuals are pooled (forces guess mode)
                             "source": {"path", "sha256", "format": "diffusers" | "original"},
                             "base": {...}}}    # the UNet numbers it was made for (== its UNet graph's "base")

The control image is ``controlnet_cond``: [B, 3, H, W], RGB in [0, 1], at the output size (prepare_image). The
graphs compute at conditioning scale 1: diffusers multiplies every residual by the scale inside
``ControlNetModel.forward`` (guess mode: by ``logspace(-1, 0, N + 1) * scale``, the last for the mid residual), a
product that commutes with everything after it, so the runtime multiplies in numpy (``residual_scales``) and one
graph serves every scale, window and guess mode. A step whose scale is 0 needs no ControlNet: the plain ``unet``
gives the same numbers (x + 0 = x). A T2I-Adapter runs once per image, before the loop; its features times
``adapter_conditioning_scale`` go to ``unet_adapter`` at every step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from sdrt.errors import UserError
from sdrt.runtime.settings import shown

CONTROLNETS = "controlnets"          # the manifest's section
UNET_CONTROL = "unet_control"        # the UNet taking a ControlNet's residuals
UNET_ADAPTER = "unet_adapter"        # the UNet taking a T2I-Adapter's features
CONTROLNET, T2I_ADAPTER = "controlnet", "t2i_adapter"
CONTROL_IMAGE = "controlnet_cond"
MID_RESIDUAL = "mid_residual"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64"
# the UNet numbers a ControlNet's residuals depend on (and the conditioning it reads), the family's tell first
FIT_KEYS = ("cross_attention_dim", "addition_embed_type", "projection_class_embeddings_input_dim", "in_channels",
            "block_out_channels", "layers_per_block", "down_block_types")
CANNY_THRESHOLDS = (100, 200)  # the ControlNet annotators' (lllyasviel/ControlNet gradio_canny2image defaults)


def down_residual(i: int) -> str:
    return f"down_residual_{i}"


def adapter_feature(i: int) -> str:
    return f"adapter_feature_{i}"


def control_component(name: str) -> str:
    return f"controlnet/{name}"


def control_record(controlnets: Mapping[str, Mapping], component: str) -> Mapping | None:
    """The record (of the manifest's ``controlnets`` section) whose graph is ``component``, or None."""
    return next((r for r in controlnets.values() if r.get("component") == component), None)


# ---- the residuals' symbolic sizes ---------------------------------------------------------------------------
LATENT_DIMS = ("latent_height", "latent_width")
LEVEL_DIM = re.compile(r"(latent_height|latent_width)_([1-9][0-9]?)")


def level_dims(level: int) -> tuple[str, str]:
    """The symbolic height and width of a residual at downsampling ``level``: ``latent_height``/``latent_width`` at
    0, ``latent_height_k``/``latent_width_k`` at k (the latent size halved k times, rounding up)."""
    return LATENT_DIMS if level == 0 else (f"{LATENT_DIMS[0]}_{level}", f"{LATENT_DIMS[1]}_{level}")


def level_size(latent: int, level: int) -> int:
    """The latent size halved ``level`` times, rounding up, as each stride-2 convolution (kernel 3, padding 1) of
    the UNet's down blocks halves it."""
    return -(-int(latent) // 2 ** level)


def dim_level(symbol) -> tuple[str, int] | None:
    """``("latent_height", k)`` for ``"latent_height_k"`` (k >= 1; likewise width), None for any other dim."""
    m = LEVEL_DIM.fullmatch(symbol) if isinstance(symbol, str) else None
    return (m.group(1), int(m.group(2))) if m else None


def check_name(name: str, what: str = "--controlnet") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise UserError(f"{what} name {name!r}: use {NAME_RULE} characters")
    return name


# ---- the manifest ------------------------------------------------------------------------------------------
def check_fits(name: str, record: Mapping, unet_entry: Mapping) -> None:
    """A ControlNet/T2I-Adapter made for this UNet: its recorded base equals the UNet graph's, and its outputs are
    the graph's extra inputs with the same shapes (one line naming the first difference)."""
    base, want = record.get("base") or {}, unet_entry.get("base") or {}
    for key in [*FIT_KEYS, *sorted((set(base) | set(want)) - set(FIT_KEYS))]:
        if base.get(key) != want.get(key):
            raise UserError(f"controlnet {name!r} was made for a model with {key}={base.get(key)!r}; this engine's "
                            f"UNet has {key}={want.get(key)!r}")
    inputs = {d["name"]: d.get("shape") for d in unet_entry.get("inputs", ())}
    for r in record.get("outputs", ()):
        if inputs.get(r["name"], "absent") != r.get("shape"):
            raise UserError(f"controlnet {name!r}: its output {r['name']} has shape {r.get('shape')}; the UNet graph "
                            f"takes {inputs.get(r['name'], 'no such input')}")


# ---- the arithmetic diffusers does around the graphs -------------------------------------------------------
def keep(i: int, steps: int, start: float, end: float) -> float:
    """1.0 while step ``i`` of ``steps`` lies in the control-guidance window, else 0.0: diffusers' ``controlnet_keep``
    (``1 - (i / steps < start or (i + 1) / steps > end)``), over the scheduler's timesteps (``len(timesteps)``,
    which counts a second-order scheduler's extra evaluations). With ``start`` 0 it is also the SDXL adapter
    pipeline's ``i < int(steps * adapter_conditioning_factor)`` for ``end`` = that factor."""
    return 1.0 - float(i / steps < start or (i + 1) / steps > end)


def controlnet_keep(steps: int, start: float, end: float) -> list[float]:
    """:func:`keep` for every step."""
    return [keep(i, steps, start, end) for i in range(steps)]


def residual_scales(count: int, scale: float, guess_mode: bool = False, global_pool: bool = False) -> np.ndarray:
    """The factor of each of ``count`` residuals (the down ones, then the mid one), as ControlNetModel.forward
    multiplies them: ``scale`` each, or in guess mode (without global pooling) ``logspace(-1, 0, count) * scale``,
    0.1 for the first to 1.0 for the mid residual, in float32 as torch computes it."""
    if guess_mode and not global_pool:
        return (torch_logspace_float32(-1.0, 0.0, count) * np.float32(scale)).astype(np.float32)
    return np.full(count, scale, dtype=np.float32)


def torch_logspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.logspace(start, end, steps)`` (float32), value for value: torch's CPU kernel takes the step in
    double, computes ``10 ** (start + i * step)`` for the first half and ``10 ** (end - (steps - 1 - i) * step)``
    for the rest, in double, and rounds each to float32."""
    start, end = float(np.float32(start)), float(np.float32(end))
    if steps == 1:
        return np.array([10.0 ** start], dtype=np.float32)
    step = (end - start) / (steps - 1)
    i = np.arange(steps, dtype=np.float64)
    exponent = np.where(i < steps // 2, start + step * i, end - step * (steps - 1 - i))
    return np.power(10.0, exponent).astype(np.float32)


def scaled(outputs: Mapping[str, np.ndarray], names: Sequence[str], scales: Sequence[float]) -> dict[str, np.ndarray]:
    """``outputs[name] * scale`` for each residual name, in float32 (a scale of 1 returns the array itself)."""
    return {n: outputs[n] if s == 1.0 else outputs[n] * np.float32(s) for n, s in zip(names, scales)}


# ---- a request's controls ----------------------------------------------------------------------------------
MAX_SCALE = 2.0


@dataclass
class ControlAsk:
    """One checked control: the ControlNet's (or T2I-Adapter's) manifest record, its prepared picture
    [1, 3, H, W] and its numbers."""

    name: str
    record: dict
    image: np.ndarray
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


def _number(what: str, value, low: float, high: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if isinstance(value, bool) or not np.isfinite(v) or not low <= v <= high:
        raise UserError(f"{what} {shown(value)}: must be a number in [{low:g}, {high:g}]")
    return v


def parse_control(spec) -> dict:
    """A control as a dict {name, image, scale, start, end} (values unchecked) from any of its forms."""
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"name", "image", "scale", "start", "end"})
        if unknown or "name" not in spec or "image" not in spec:
            raise UserError(f"controls {shown(spec)}: give name and image, and optionally scale, start, end"
                            + (f" (not {unknown[0]!r})" if unknown else ""))
        return dict(spec)
    if isinstance(spec, (tuple, list)) and 2 <= len(spec) <= 5:
        return dict(zip(("name", "image", "scale", "start", "end"), spec))
    if isinstance(spec, str) and ":" in spec:
        name, _, rest = spec.partition(":")
        parts = rest.rsplit(":", 3)
        numbers: list[str] = []
        while parts and len(numbers) < 3 and _is_number(parts[-1]) and len(parts) > 1:
            numbers.insert(0, parts.pop())
        if len(numbers) == 2:   # IMAGE:SCALE:START without END is not a form: the START was part of the path
            parts.append(numbers.pop(0))
        out = {"name": name, "image": ":".join(parts)}
        out.update(zip(("scale", "start", "end"), numbers))
        return out
    raise UserError(f"controls {shown(spec)}: must be NAME:IMAGE[:SCALE[:START:END]], a dict or a tuple")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def check_controls(specs, controlnets: Mapping[str, Mapping], height: int, width: int,
                   guess_mode: bool = False) -> list[ControlAsk]:
    """Each control checked against the engine's ControlNets and T2I-Adapters (``controlnets``: the manifest's
    records by name) and its picture prepared at the output size; a bad one is a one-line UserError naming it."""
    if specs is None:
        return []
    if isinstance(specs, (str, dict)) or not isinstance(specs, (list, tuple)):
        specs = [specs]
    out = []
    for spec in specs:
        c = parse_control(spec)
        name = c["name"]
        if name not in controlnets:
            have = ", ".join(controlnets) if controlnets else \
                "none (add one with `sdrt export MODEL_DIR ENGINE_DIR --add --controlnet DIR:NAME`)"
            raise UserError(f"controls {name!r}: this engine has no such ControlNet; it has {have}")
        record = controlnets[name]
        scale = _number(f"controls {name!r} scale", c.get("scale", 1.0), 0.0, MAX_SCALE)
        start = _number(f"controls {name!r} start", c.get("start", 0.0), 0.0, 1.0)
        end = _number(f"controls {name!r} end", c.get("end", 1.0), 0.0, 1.0)
        if start >= end:
            raise UserError(f"controls {name!r}: start {start:g} must be below end {end:g}")
        multiple = int(record.get("image_multiple", 1))
        if height % multiple or width % multiple:
            raise UserError(f"controls {name!r}: {width}x{height} is not a multiple of {multiple}, which this "
                            f"{'T2I-Adapter' if record.get('kind') == T2I_ADAPTER else 'ControlNet'} needs; choose "
                            f"a size that divides by {multiple}")
        out.append(ControlAsk(name, dict(record), control_image(c["image"], height, width, name),
                              scale, start, end))
    kinds = {a.record.get("kind", CONTROLNET) for a in out}
    if len(kinds) > 1:
        named = ", ".join(f"{a.name} ({a.record.get('kind', CONTROLNET)})" for a in out)
        raise UserError(f"controls: a request takes ControlNets or T2I-Adapters, not both (each has its own UNet "
                        f"graph): {named}")
    if guess_mode and T2I_ADAPTER in kinds:
        raise UserError("guess_mode: only ControlNets use it, and these controls are T2I-Adapters")
    return out


def control_image(source, height: int, width: int, name: str = "") -> np.ndarray:
    """diffusers' ``control_image_processor.preprocess`` (and the adapter pipelines' ``_preprocess_adapter_image``):
    resize (Lanczos) to width x height, RGB, /255 -> [1, 3, H, W] float32 in [0, 1]. A PIL image is resized in its
    own mode, then made RGB, as diffusers does; a file is read as RGB (diffusers' ``load_image``)."""
    from PIL import Image

    from sdrt.runtime.masks import open_image

    what = f"controls {name!r} image" if name else "control image"
    image = source.copy() if isinstance(source, Image.Image) else open_image(source, what, "RGB")
    image = image.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None).convert("RGB")
    return np.ascontiguousarray((np.asarray(image).astype(np.float32) / 255.0).transpose(2, 0, 1)[None])


# ---- Canny ---------------------------------------------------------------------------------------------------
def canny(image: np.ndarray, low: float = CANNY_THRESHOLDS[0], high: float = CANNY_THRESHOLDS[1]) -> np.ndarray:
    """Canny edges of an ``[H, W, 3]`` or ``[H, W]`` uint8 image as ``[H, W, 3]`` uint8, 255 on an edge: what the
    ControlNet annotators feed a canny ControlNet (``cv2.Canny(rgb, low, high)`` stacked to three channels).

    OpenCV's algorithm in integers (imgproc/src/canny.cpp, L1 gradient, aperture 3): 3x3 Sobel per channel with
    replicated borders, magnitude ``|gx| + |gy|`` of the channel where it is largest (the first on ties); non-maximum
    suppression across the edge in one of four directions told by tan(22.5) in 15-bit fixed point; hysteresis from
    the pixels above ``floor(high)`` through 8-connected ones above ``floor(low)``. No blur (Canny has none).
    """
    try:
        lo, hi = sorted((math.floor(float(low)), math.floor(float(high))))
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"canny thresholds {low!r}/{high!r}: must be numbers") from None
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] not in (1, 3)):
        raise UserError(f"canny: expected an [H, W, 3] or [H, W] uint8 image, got {img.dtype} {list(img.shape)}")
    channels = img.reshape(img.shape[0], img.shape[1], -1).astype(np.int32)
    p = np.pad(channels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = img.shape[:2]

    def at(dy, dx):
        return p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    mags = np.abs(gx) + np.abs(gy)
    pick = np.argmax(mags, axis=2)[:, :, None]  # the first channel of largest magnitude
    mag, gx, gy = (np.take_along_axis(a, pick, axis=2)[:, :, 0] for a in (mags, gx, gy))
    candidate = _non_maximum(mag, gx, gy) & (mag > lo)
    edges = _hysteresis(candidate, candidate & (mag > hi))
    return np.repeat(np.where(edges, np.uint8(255), np.uint8(0))[:, :, None], 3, axis=2)


CANNY_SHIFT = 15
TG22 = int(0.4142135623730950488016887242097 * (1 << CANNY_SHIFT) + 0.5)


def _non_maximum(mag: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Where the magnitude is a maximum across the edge, as OpenCV tests it: against the left/right neighbours
    when |gy| < tan(22.5) |gx|, above/below when |gy| > tan(67.5) |gx|, else the diagonal the gradient's signs
    pick; strictly greater than the neighbour before (and, left/right and above/below, at least the one after),
    so a plateau keeps one pixel. Outside the image the magnitude is 0."""
    h, w = mag.shape
    m = np.pad(mag, 1)

    def at(dy, dx):
        return m[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    x = np.abs(gx).astype(np.int64)
    y = np.abs(gy).astype(np.int64) << CANNY_SHIFT
    tg22x = x * TG22
    tg67x = tg22x + (x << (CANNY_SHIFT + 1))
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg67x)
    opposite = (gx ^ gy) < 0  # signs differ: the edge runs from bottom-left to top-right
    diagonal = np.where(opposite, (mag > at(-1, 1)) & (mag > at(1, -1)), (mag > at(-1, -1)) & (mag > at(1, 1)))
    return np.where(horizontal, (mag > at(0, -1)) & (mag >= at(0, 1)),
                    np.where(vertical, (mag > at(-1, 0)) & (mag >= at(1, 0)), diagonal))


def _hysteresis(candidate: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The candidates 8-connected to a strong pixel (grown by dilation until nothing changes)."""
    from PIL import Image, ImageFilter

    edges = strong
    while True:
        # a 3x3 maximum filter on 0/255 pixels: PIL does it in C, where a numpy loop would take 9 passes a round
        pixels = Image.fromarray(np.where(edges, np.uint8(255), np.uint8(0)))
        grown = np.asarray(pixels.filter(ImageFilter.MaxFilter(3)))
        grown = (grown > 0) & candidate
        if np.array_equal(grown, edges):
            return edges
        edges = grown


PREPROCESSORS = ("none", "canny")


def preprocess(image, module: str, low: float = 100, high: float = 200):
    """A control picture through a preprocessor that needs no model: ``none`` (as given) or ``canny``."""
    if module not in PREPROCESSORS:
        raise UserError(f"module {module!r}: sdrt's preprocessors are {', '.join(PREPROCESSORS)} (depth, pose and "
                        "others need a model: run them elsewhere and give the picture with module none)")
    if module == "none":
        return image
    from sdrt.runtime.masks import open_image

    return canny(np.asarray(open_image(image, "control image", "RGB")), low, high)
