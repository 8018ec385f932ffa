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

from pydantic import BaseModel, ConfigDict, Field, create_model

from sdrt.errors import UserError
from sdrt.runtime.schedulers import SCHEDULER_NAMES
from sdrt.runtime.settings import TABLE, check_size, native_help


def _native_fields() -> dict:
    """The native request's fields, from the settings table: its JSON type, default and description each."""
    return {s.native: (s.json or s.type, Field(... if s.required else s.default, description=native_help(s)))
            for s in TABLE if s.native is not None}


# ``POST /v1/images`` and ``POST /v1/jobs``: strict types and no unknown field
ImageRequest = create_model("ImageRequest", __config__=ConfigDict(extra="forbid", strict=True),
                            __doc__="``POST /v1/images`` and ``POST /v1/jobs``.", **_native_fields())
# the native fields that are Pipeline.request's settings (the others, timeout and preview_every, are the service's)
NATIVE_SETTINGS = {s.native: s.name for s in TABLE if s.native is not None and s.pipeline}


def decode_base64_image(data: str, field: str) -> bytes:
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{field}: not valid base64") from None


def native_settings(body: ImageRequest, pipeline) -> dict:
    """Keyword arguments for ``Engine.submit`` from a native request (the init image decoded and prepared)."""
    settings = {name: getattr(body, field) for field, name in NATIVE_SETTINGS.items() if name != "init_image"}
    if settings.get("mask") is not None:
        settings["mask"] = decode_base64_image(settings["mask"], "mask")
    if settings.get("controls"):   # each control's picture arrives in base64
        settings["controls"] = [dict(c, image=decode_base64_image(c["image"], f"controls[{i}].image"))
                                if isinstance(c, dict) and isinstance(c.get("image"), str) else c
                                for i, c in enumerate(settings["controls"])]
    if body.init_image is None:
        return settings   # Pipeline.request refuses a strength (or a mask) without an init image
    image = decode_base64_image(body.init_image, "init_image")
    if settings.get("mask") is not None or settings.get("outpaint") is not None:
        return dict(settings, init_image=image)   # inpainting prepares the picture itself (and keeps it to paste back)
    return with_init_image(settings, image, pipeline, settings.pop("strength"))


def with_init_image(settings: dict, image: bytes, pipeline, strength: float | None) -> dict:
    """As ``sdrt generate --init-image``: height/width, when given, resize the picture; it then sets the size.
    ``strength`` None: the default."""
    from sdrt.runtime.images import load_init_image

    m = pipeline.model
    for what in ("height", "width"):
        if settings.get(what) is not None:
            check_size(what, settings[what], m.size_multiple)
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
    send_images: bool = True
    # inpainting (img2img with a mask), AUTOMATIC1111's defaults; the original is always pasted back outside the mask
    mask: str | None = None
    mask_blur: int | None = None           # both axes; None: mask_blur_x and mask_blur_y
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0               # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = True          # "only masked"
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None


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
               if name.lower() != "controlnet" and not (isinstance(spec, dict) and spec.get("args") in ([], [False], None))]
    if enabled:
        asked.append(f"alwayson_scripts {', '.join(enabled)}")
    if asked:
        raise UserError(f"{'; '.join(asked)}: not supported by sdrt")
    if img2img and not body.init_images:
        raise UserError("init_images: img2img needs one picture")
    if img2img and len(body.init_images) > 1:
        raise UserError(f"init_images: {len(body.init_images)} given, sdrt takes one")
    if not body.send_images:
        raise UserError("send_images false: sdrt answers with the images (it saves none on the server)")


A1111_FILL = ("fill", "original", "latent-noise", "latent-nothing")   # inpainting_fill 0..3


def a1111_inpainting(body: A1111Request) -> dict:
    """Pipeline.request's inpainting settings for an A1111 img2img request with a mask, as A1111 runs it: its
    mask blur per axis, masked content, "only masked" with its padding, and the original pasted back."""
    if body.inpainting_fill not in range(len(A1111_FILL)):
        raise UserError(f"inpainting_fill {body.inpainting_fill!r}: must be 0 (fill), 1 (original), 2 (latent noise) "
                        "or 3 (latent nothing)")
    blur = (body.mask_blur, body.mask_blur) if body.mask_blur is not None else (body.mask_blur_x, body.mask_blur_y)
    return dict(mask=decode_base64_image(body.mask, "mask"), mask_blur=blur,
                mask_invert=bool(body.inpainting_mask_invert), masked_content=A1111_FILL[body.inpainting_fill],
                inpaint_area="masked" if body.inpaint_full_res else "whole",
                inpaint_padding=body.inpaint_full_res_padding, overlay=True)


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
        image = decode_base64_image(body.init_images[0], "init_images[0]")
        if body.mask:
            settings.update(a1111_inpainting(body), init_image=image, strength=strength)
        else:
            settings = with_init_image(settings, image, pipeline, strength)
        if body.initial_noise_multiplier is not None:
            settings["noise_multiplier"] = body.initial_noise_multiplier
    elif body.mask:
        raise UserError("mask: inpainting is /sdapi/v1/img2img with init_images")
    controls, guess = a1111_controlnet(body, pipeline)
    if controls:
        settings.update(controls=controls, guess_mode=guess)
    seeds = [seed + i for i in range(count)]
    return [dict(settings, seed=s) for s in seeds], seeds


# ---- the ControlNet extension's API (sd-webui-controlnet) ------------------------------------------------------
A1111_RESIZE = ("just resize", "0")
A1111_CONTROL_MODES = {"balanced": False, "0": False, "controlnet is more important": True, "2": True}


def a1111_controlnet_model(model: str | None, pipeline) -> str:
    """The engine's ControlNet an A1111 ``model`` names: its name, or an A1111 title "name [hash]"."""
    names = list(getattr(pipeline, "controlnets", {}))
    wanted = (model or "").split(" [")[0].strip()
    for name in names:
        if wanted.lower() in (name, name.replace("-", "_")) or wanted.lower().replace("_", "-") == name:
            return name
    raise UserError(f"controlnet model {model!r}: this engine has "
                    + (", ".join(names) if names else "no ControlNet (export with `sdrt export --controlnet`)"))


def a1111_controlnet(body: A1111Request, pipeline) -> tuple[list[dict], bool]:
    """The ControlNet units of ``alwayson_scripts.controlnet.args`` as sdrt controls, and whether guess mode
    (A1111's control_mode "ControlNet is more important"). Only what sdrt does as A1111 does it is taken: Just
    Resize, the preprocessors none and canny, the Balanced and ControlNet-is-more-important modes."""
    from sdrt.runtime.control import preprocess

    spec = next((v for k, v in (body.alwayson_scripts or {}).items() if k.lower() == "controlnet"), None)
    units = [u for u in ((spec or {}).get("args") or []) if isinstance(u, dict) and u.get("enabled", True)]
    controls, modes = [], set()
    for i, unit in enumerate(units):
        where = f"alwayson_scripts.controlnet.args[{i}]"
        image = unit.get("image") or unit.get("input_image")
        if isinstance(image, dict):   # {"image": b64, "mask": b64} from the extension's own UI
            image = image.get("image")
        if not isinstance(image, str):
            raise UserError(f"{where}.image: give the control picture (base64)")
        resize = str(unit.get("resize_mode", "Just Resize")).strip().lower()
        if resize not in A1111_RESIZE:
            raise UserError(f"{where}.resize_mode {unit.get('resize_mode')!r}: sdrt does Just Resize only")
        mode = str(unit.get("control_mode", "Balanced")).strip().lower()
        if mode not in A1111_CONTROL_MODES:
            raise UserError(f"{where}.control_mode {unit.get('control_mode')!r}: sdrt does Balanced and "
                            "ControlNet is more important (diffusers' guess mode)")
        modes.add(A1111_CONTROL_MODES[mode] or bool(unit.get("guess_mode")))
        picture = preprocess(decode_base64_image(image, f"{where}.image"), str(unit.get("module") or "none").lower(),
                             unit.get("threshold_a", 100) if unit.get("threshold_a", -1) not in (-1, None) else 100,
                             unit.get("threshold_b", 200) if unit.get("threshold_b", -1) not in (-1, None) else 200)
        controls.append({"name": a1111_controlnet_model(unit.get("model"), pipeline), "image": picture,
                         "scale": unit.get("weight", 1.0), "start": unit.get("guidance_start", 0.0),
                         "end": unit.get("guidance_end", 1.0)})
    if len(modes) > 1:
        raise UserError("alwayson_scripts.controlnet: one control_mode for all units (guess mode is per request)")
    return controls, bool(modes and modes.pop())


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


# sdrt's own settings an OpenAI request may add, under their sdrt names (the table's OpenAI names that are sdrt's)
OPENAI_EXTRA = tuple(s.name for s in TABLE if s.openai == s.name and s.name not in ("prompt", "negative_prompt"))


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
    for key in OPENAI_EXTRA:
        value = getattr(body, key)
        if value is not None:
            settings[key] = value
    return settings

