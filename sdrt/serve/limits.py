"""The service's limits, declared once (as the request settings are, sdrt.runtime.settings): `sdrt serve`'s
options, ``ServeConfig``, and the engine and its ``Limits`` read their defaults here."""

from __future__ import annotations

from sdrt.runtime.settings import Setting

_AT_LEAST_ONE = dict(allowed=">= 1", check=lambda v: v >= 1, metavar="N")

LIMITS: tuple[Setting, ...] = (
    Setting("max_batch", int, 8, "images in one UNet call, and being denoised at once (default {default}; a guided "
            "image is two UNet samples)", flag="--max-batch", **_AT_LEAST_ONE),
    Setting("max_queue", int, 64, "requests waiting to start; past it, 429 with Retry-After (default {default})",
            flag="--max-queue", **_AT_LEAST_ONE),
    Setting("timeout", float, 600.0, "deadline of a request in seconds, queue included; past it, 504 (default "
            "{default:g}; a request may ask for less)", "> 0 seconds", lambda v: v > 0, flag="--timeout",
            metavar="S"),
    Setting("max_steps", int, 150, "steps per request (default {default})", flag="--max-steps", **_AT_LEAST_ONE),
    Setting("max_images", int, 8, "images per request (default {default})", flag="--max-images", **_AT_LEAST_ONE),
    Setting("max_pixels", int, None, "width x height per image (default: 4x the model's default size)",
            flag="--max-pixels", **_AT_LEAST_ONE),
)
LIMIT: dict[str, Setting] = {s.name: s for s in LIMITS}
