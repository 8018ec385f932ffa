"""Request bodies of the three APIs and their translation into engine submissions (no model logic here).

* native (``/v1/images``, ``/v1/jobs``): the long option names of ``sdrt generate`` with underscores; strict
  types and no unknown fields, so a typo is a 422 naming the field rather than a silently ignored setting;
* AUTOMATIC1111 (``/sdapi/v1/txt2img``, ``/sdapi/v1/img2img``): its field names, every field its clients send
  accepted; fields that ask for something sdrt does not do (hires fix, face restoration, inpainting, scripts)
  are a 400 naming them, and sampler-tuning fields sdrt's samplers do not read (eta, s_churn, ...) are ignored;
* OpenAI (``/v1/images/generations``): prompt, n, size, response_format b64_json; sdrt's own settings may be
  added as extra fields (``extra_body`` in OpenAI's client).
"""

from __future__ import annotations

import base64
import binascii
import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sdrt.errors import UserError
from sdrt.runtime.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, DEFAULT_STRENGTH
from sdrt.runtime.schedulers import SCHEDULER_NAMES


class ImageRequest(BaseModel):
    """``POST /v1/images`` and ``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    negative_prompt: str | None = None
    prompt_2: str | None = Field(default=None, description="SDXL base: what the second text encoder reads instead of prompt")
    negative_prompt_2: str | None = Field(default=None, description="SDXL base: the second encoder's negative_prompt")
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    guidance_rescale: float = Field(default=0.0, description="in [0, 1]: diffusers' guidance_rescale (0: off)")
    seed: int | None = Field(default=None, description="default: random (answered in `seeds`)")
    scheduler: str | None = Field(default=None, description=f"one of {', '.join(SCHEDULER_NAMES)}; default: the model's")
    height: int | None = Field(default=None, description="default: the model's (img2img: the init image's)")
    width: int | None = None
    num_images: int = 1
    init_image: str | None = Field(default=None, description="img2img: the picture, base64 (a data: URL is fine)")
    strength: float | None = Field(default=None, description=f"img2img only: how much to change it (default {DEFAULT_STRENGTH})")
    timeout: float | None = Field(default=None, description="seconds; at most the service's --timeout")
    preview_every: int = Field(default=0, description="job events: a preview PNG every N steps (0: none)")
    truncate: bool = Field(default=False, description="cut prompts at 75 tokens as diffusers does (default: chunks)")
    weighting: bool = Field(default=True, description="read (word:1.3), (word), [word] and BREAK as AUTOMATIC1111 does")


def decode_base64_image(data: str, field: str) -> bytes:
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{field}: not valid base64") from None


def native_settings(body: ImageRequest, pipeline) -> dict:
    """Keyword arguments for ``Engine.submit`` from a native request (the init image decoded and prepared)."""
    settings = body.model_dump(exclude={"init_image", "timeout", "preview_every", "strength"})
    if body.init_image is None:
        if body.strength is not None:
            raise UserError("strength: only meaningful with init_image (img2img)")
        return settings
    return with_init_image(settings, decode_base64_image(body.init_image, "init_image"), pipeline,
                           DEFAULT_STRENGTH if body.strength is None else body.strength)


def with_init_image(settings: dict, image: bytes, pipeline, strength: float) -> dict:
    """As ``sdrt generate --init-image``: height/width, when given, resize the picture; it then sets the size."""
    from sdrt.runtime.images import load_init_image

    m = pipeline.model
    for what in ("height", "width"):
        v = settings.get(what)
        if v is not None and (v <= 0 or v % m.size_multiple):
            raise UserError(f"{what} {v}: must be a positive multiple of {m.size_multiple} for this model")
    settings = dict(settings, strength=strength)
    settings["init_image"] = load_init_image(image, m.vae_scale_factor, settings.pop("height", None),
                                             settings.pop("width", None))
    return settings


# ---- AUTOMATIC1111 ------------------------------------------------------------------------------------------

# A1111 sampler name (lower case) -> sdrt scheduler; "DPM++ 2M" with schedule type Karras is dpmpp_2m_karras.
A1111_TO_SDRT = {
    "euler a": "euler_a", "euler": "euler", "lms": "lms", "heun": "heun", "dpm++ 2m": "dpmpp_2m",
    "dpm++ 2m karras": "dpmpp_2m_karras", "ddim": "ddim", "plms": "pndm", "unipc": "unipc", "lcm": "lcm",
    "ddpm": "ddpm",
}
A1111_SAMPLER_NAMES = ("Euler a", "Euler", "LMS", "Heun", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "PLMS", "UniPC",
                       "LCM", "DDPM")


class A1111Request(BaseModel):
    """``/sdapi/v1/txt2img`` and ``/sdapi/v1/img2img``: every field A1111's clients send is accepted."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str | None = ""
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    denoising_strength: float | None = None
    init_images: list[str] | None = None
    # features sdrt does not have: refused when asked for
    enable_hr: bool = False
    restore_faces: bool | None = False
    tiling: bool | None = False
    subseed_strength: float = 0.0
    styles: list[str] | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = None
    mask: str | None = None
    send_images: bool = True


def a1111_scheduler(sampler: str | None, schedule: str | None) -> str | None:
    """The sdrt scheduler for an A1111 sampler name and schedule type (None: the model's own)."""
    schedule_l = (schedule or "automatic").strip().lower()
    if sampler is None or not sampler.strip():
        if schedule_l != "automatic":
            raise UserError(f"scheduler {schedule!r}: give a sampler_name with a schedule type")
        return None
    name = A1111_TO_SDRT.get(sampler.strip().lower()) or (sampler if sampler in SCHEDULER_NAMES else None)
    if name is None:
        raise UserError(f"sampler_name {sampler!r}: not available; choose one of: {', '.join(A1111_SAMPLER_NAMES)}")
    if schedule_l == "karras" and name in ("dpmpp_2m", "dpmpp_2m_karras"):
        return "dpmpp_2m_karras"
    if schedule_l != "automatic":
        raise UserError(f"scheduler {schedule!r} with sampler {sampler!r}: sdrt has Automatic for every sampler and "
                        "Karras for DPM++ 2M")
    return name


def a1111_refusals(body: A1111Request, img2img: bool) -> None:
    asked = []
    if body.enable_hr:
        asked.append("enable_hr (hires fix)")
    if body.restore_faces:
        asked.append("restore_faces")
    if body.tiling:
        asked.append("tiling")
    if body.subseed_strength:
        asked.append("subseed_strength (variation seeds)")
    if body.styles:
        asked.append("styles")
    if body.script_name:
        asked.append(f"script_name {body.script_name!r}")
    enabled = [name for name, spec in (body.alwayson_scripts or {}).items()
               if not (isinstance(spec, dict) and spec.get("args") in ([], [False], None))]
    if enabled:
        asked.append(f"alwayson_scripts {', '.join(enabled)}")
    if body.mask or (body.model_extra or {}).get("mask_image"):
        asked.append("mask (inpainting)")
    if asked:
        raise UserError(f"{'; '.join(asked)}: not supported by sdrt")
    if img2img and not body.init_images:
        raise UserError("init_images: img2img needs one picture")
    if img2img and len(body.init_images) > 1:
        raise UserError(f"init_images: {len(body.init_images)} given, sdrt takes one")
    if not body.send_images:
        raise UserError("send_images false: sdrt answers with the images (it saves none on the server)")


def a1111_submissions(body: A1111Request, img2img: bool, pipeline) -> tuple[list[dict], list[int]]:
    """One engine request per image, seeds seed, seed+1, ... as A1111 gives a batch; and those seeds."""
    a1111_refusals(body, img2img)
    for field, value in (("batch_size", body.batch_size), ("n_iter", body.n_iter)):
        if value < 1:
            raise UserError(f"{field} {value}: must be >= 1")
    count = body.batch_size * body.n_iter
    seed = secrets.randbelow(4294967294) if body.seed == -1 else body.seed
    settings = dict(prompt=body.prompt, negative_prompt=body.negative_prompt or None, steps=body.steps,
                    guidance=body.cfg_scale, scheduler=a1111_scheduler(body.sampler_name or body.sampler_index,
                                                                       body.scheduler),
                    height=body.height, width=body.width)
    if img2img:
        strength = 0.75 if body.denoising_strength is None else body.denoising_strength
        settings = with_init_image(settings, decode_base64_image(body.init_images[0], "init_images[0]"), pipeline,
                                   strength)
    seeds = [seed + i for i in range(count)]
    return [dict(settings, seed=s) for s in seeds], seeds


# ---- OpenAI ---------------------------------------------------------------------------------------------------

class OpenAIImageRequest(BaseModel):
    """``POST /v1/images/generations``; extra sdrt fields: negative_prompt, steps, guidance, seed, scheduler."""

    model_config = ConfigDict(extra="allow")

    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None
    response_format: str | None = "b64_json"
    output_format: str | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    scheduler: str | None = None


def openai_settings(body: OpenAIImageRequest) -> dict:
    if body.response_format not in (None, "b64_json"):
        raise UserError(f"response_format {body.response_format!r}: sdrt answers b64_json only (it hosts no URLs)")
    if (body.model_extra or {}).get("stream"):
        raise UserError("stream: sdrt answers with the finished images; follow progress with POST /v1/jobs and its events")
    if body.output_format not in (None, "png"):
        raise UserError(f"output_format {body.output_format!r}: sdrt writes png only")
    settings: dict = dict(prompt=body.prompt, negative_prompt=body.negative_prompt, num_images=body.n)
    if body.size not in (None, "auto"):
        width, sep, height = body.size.partition("x")
        if not (sep and width.isdigit() and height.isdigit()):
            raise UserError(f"size {body.size!r}: must be WIDTHxHEIGHT, e.g. 512x512")
        settings.update(width=int(width), height=int(height))
    for key in ("steps", "guidance", "seed", "scheduler"):
        value = getattr(body, key)
        if value is not None:
            settings[key] = value
    return settings

