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
            raise UserError(f"control {shown(spec)}: give name and image, and optionally scale, start, end"
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
    raise UserError(f"control {shown(spec)}: must be NAME:IMAGE[:SCALE[:START:END]], a dict or a tuple")


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
            raise UserError(f"control {name!r}: this engine has no such ControlNet; it has {have}")
        scale = _number(f"control {name!r} scale", c.get("scale", 1.0), 0.0, MAX_SCALE)
        start = _number(f"control {name!r} start", c.get("start", 0.0), 0.0, 1.0)
        end = _number(f"control {name!r} end", c.get("end", 1.0), 0.0, 1.0)
        if start >= end:
            raise UserError(f"control {name!r}: start {start:g} must be below end {end:g}")
        out.append(ControlAsk(name, controlnets[name], control_image(c["image"], height, width, name),
                              scale, start, end))
    return out


def control_image(source, height: int, width: int, name: str = "") -> np.ndarray:
    """diffusers' ``control_image_processor.preprocess``: resize (Lanczos) to width x height, RGB, /255 ->
    [1, 3, H, W] float32 in [0, 1]."""
    from sdrt.runtime.masks import open_image

    image = open_image(source, f"control {name!r} image" if name else "control image", "RGB")
    image = image.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)
    return np.ascontiguousarray((np.asarray(image).astype(np.float32) / 255.0).transpose(2, 0, 1)[None])
