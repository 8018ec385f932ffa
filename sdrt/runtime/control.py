"""ControlNets on a request: what each is given, and its conditioning picture prepared as diffusers prepares it.

A control is ``NAME:IMAGE[:SCALE[:START:END]]`` (the command line), a dict with those keys, or a tuple: the
engine's ControlNet ``NAME`` (``sdrt export --controlnet DIR:NAME``), the picture it reads, its conditioning
scale (default 1) and the fraction of the schedule it acts in (default 0 to 1), as diffusers'
``controlnet_conditioning_scale`` and ``control_guidance_start/end``. The picture goes through diffusers'
``control_image_processor``: Lanczos resize to the output size, RGB, ``/255`` (no normalisation: [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdrt.errors import UserError
from sdrt.runtime.settings import shown

MAX_SCALE = 2.0


@dataclass
class ControlAsk:
    """One checked control: the ControlNet's component, its prepared picture [1, 3, H, W] and its numbers."""

    name: str
    component: str
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


def check_controls(specs, controlnets: dict[str, str], height: int, width: int) -> list[ControlAsk]:
    """Each control checked against the engine's ControlNets (``controlnets``: name -> component) and its
    picture prepared at the output size; a bad one is a one-line UserError naming it."""
    if specs is None:
        return []
    if isinstance(specs, (str, dict)) or not isinstance(specs, (list, tuple)):
        specs = [specs]
    out = []
    for spec in specs:
        c = parse_control(spec)
        name = c["name"]
        if name not in controlnets:
            have = ", ".join(controlnets) if controlnets else "none (export with `sdrt export --controlnet DIR:NAME`)"
            raise UserError(f"controls {name!r}: this engine has no such ControlNet; it has {have}")
        scale = _number(f"controls {name!r} scale", c.get("scale", 1.0), 0.0, MAX_SCALE)
        start = _number(f"controls {name!r} start", c.get("start", 0.0), 0.0, 1.0)
        end = _number(f"controls {name!r} end", c.get("end", 1.0), 0.0, 1.0)
        if start >= end:
            raise UserError(f"controls {name!r}: start {start:g} must be below end {end:g}")
        out.append(ControlAsk(name, controlnets[name], control_image(c["image"], height, width, name),
                              scale, start, end))
    return out


def control_image(source, height: int, width: int, name: str = "") -> np.ndarray:
    """diffusers' ``control_image_processor.preprocess``: resize (Lanczos) to width x height, RGB, /255 ->
    [1, 3, H, W] float32 in [0, 1]."""
    from sdrt.runtime.masks import open_image

    image = open_image(source, f"controls {name!r} image" if name else "control image", "RGB")
    image = image.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)
    return np.ascontiguousarray((np.asarray(image).astype(np.float32) / 255.0).transpose(2, 0, 1)[None])


# ---- preprocessors that need no model --------------------------------------------------------------------------
PREPROCESSORS = ("none", "canny")


def canny(image, low: float = 100, high: float = 200) -> np.ndarray:
    """OpenCV's ``Canny(gray, low, high)`` with its defaults (3x3 Sobel, L1 gradient magnitude, no blur first), as
    the ControlNet annotators call it: non-maximum suppression along the gradient's direction, then hysteresis
    (pixels above ``high`` and those above ``low`` connected to them). [H, W, 3] uint8, white edges on black."""
    from sdrt.runtime.masks import open_image

    rgb = np.asarray(open_image(image, "control image", "RGB")).astype(np.float32)
    gray = np.rint(rgb @ np.array([0.299, 0.587, 0.114], np.float32))
    p = np.pad(gray, 1, mode="reflect")   # OpenCV's default border, reflect-101
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    mag = np.abs(dx) + np.abs(dy)
    m = np.pad(mag, 1)
    # the direction, in four sectors: horizontal, vertical and the two diagonals (tan 22.5 = 0.4142)
    ax, ay = np.abs(dx), np.abs(dy)
    horizontal = ay <= ax * 0.41421356
    vertical = ay > ax * 2.41421356
    same_sign = (dx * dy) > 0
    h, w = mag.shape
    c = (slice(1, h + 1), slice(1, w + 1))

    def shifted(oy, ox):
        return m[1 + oy:h + 1 + oy, 1 + ox:w + 1 + ox]

    n1 = np.where(horizontal, shifted(0, -1), np.where(vertical, shifted(-1, 0),
                                                       np.where(same_sign, shifted(-1, -1), shifted(-1, 1))))
    n2 = np.where(horizontal, shifted(0, 1), np.where(vertical, shifted(1, 0),
                                                      np.where(same_sign, shifted(1, 1), shifted(1, -1))))
    peak = (m[c] > n1) & (m[c] >= n2) & (mag > low)
    strong = peak & (mag > high)
    edges = strong.copy()
    weak = peak & ~strong
    while True:   # grow the strong edges through 8-connected weak pixels
        e = np.pad(edges, 1)
        near = np.zeros_like(edges)
        for oy in (-1, 0, 1):
            for ox in (-1, 0, 1):
                near |= e[1 + oy:h + 1 + oy, 1 + ox:w + 1 + ox]
        grown = edges | (weak & near)
        if (grown == edges).all():
            break
        edges = grown
    return np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=-1)


def preprocess(image, module: str, low: float = 100, high: float = 200):
    """A control picture through a preprocessor that needs no model: ``none`` (as given) or ``canny``."""
    if module not in PREPROCESSORS:
        raise UserError(f"module {module!r}: sdrt's preprocessors are {', '.join(PREPROCESSORS)} (depth, pose and "
                        "others need a model: run them elsewhere and give the picture with module none)")
    return image if module == "none" else canny(image, low, high)
