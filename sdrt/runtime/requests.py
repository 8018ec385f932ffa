"""A request and ``Pipeline.request``'s checks: every setting against the table (sdrt.runtime.settings) and the
model, into a ``Request``; a bad setting is a UserError naming it. And a generation's ``Result``."""

from __future__ import annotations

import logging
import os
import secrets
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from sdrt.errors import UserError
from sdrt.runtime.prompts import PromptTokens
from sdrt.runtime.schedulers import Scheduler, make_scheduler
from sdrt.runtime.settings import (DEFAULT_AESTHETIC_SCORE, DEFAULT_NEGATIVE_AESTHETIC_SCORE, DEFAULT_STRENGTH,
                                   INPAINT_OPTIONS, SETTING, TABLE, check_size, shown)

logger = logging.getLogger("sdrt.runtime.pipeline")   # the name callers filter on, as before the move


@dataclass
class Request:
    """One generation's settings, checked against the model (``Pipeline.request`` builds and checks it)."""

    prompts: list[str]
    negative_prompts: list[str]
    steps: int
    guidance: float
    seed: int
    scheduler: str
    height: int
    width: int
    num_images: int
    init_image: np.ndarray | None = None   # [1, 3, H, W] float32 in [-1, 1]
    strength: float = 1.0
    schedule: Scheduler | None = field(default=None, repr=False, compare=False)  # built and checked by request()
    truncate: bool = False      # keep each prompt's first 75 tokens (diffusers' cut) instead of chunking
    weighting: bool = True      # read AUTOMATIC1111's emphasis syntax: (word), [word], (word:1.3), BREAK
    prompt_tokens: PromptTokens | None = field(default=None, repr=False, compare=False)  # read by request()
    guidance_embedded: bool = False   # an LCM-distilled UNet: guidance is an input, never a second pass
    zero_negative: bool = False       # SDXL with no negative prompt: zeros instead of the encoded "" (its flag)
    # SDXL's size and crop conditioning, in pixels (None: the output size), and the refiner's aesthetic scores
    original_size: tuple[int, int] | None = None
    crop: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    aesthetic_score: float = DEFAULT_AESTHETIC_SCORE
    negative_aesthetic_score: float = DEFAULT_NEGATIVE_AESTHETIC_SCORE
    guidance_rescale: float = 0.0     # diffusers' rescale of the guided prediction's spread (0: none)
    # SDXL base: what the second text encoder reads instead of the prompts / negative prompts (None: the same)
    prompts_2: list[str] | None = None
    negative_prompts_2: list[str] | None = None
    # SDXL's base + refiner handoff: stop / start that far through the schedule (None: its end / start); the
    # refiner starts from the base's latents (init_latents, [1 or batch, C, h, w], scaled as the UNet sees them)
    denoising_start: float | None = None
    denoising_end: float | None = None
    init_latents: np.ndarray | None = field(default=None, repr=False)
    # inpainting: [1, 1, H, W] float32, 1 where the init image is repainted (binarised as diffusers' mask_processor);
    # what the init latents hold under the mask (sdrt.runtime.masks.MASKED_CONTENT); how the pictures are finished
    mask: np.ndarray | None = field(default=None, repr=False)
    masked_content: str = "original"
    noise_multiplier: float = 1.0     # AUTOMATIC1111's initial noise multiplier (img2img and inpainting)
    # ControlNets (sdrt.runtime.control.ControlAsk: component, picture, scale, window) and diffusers' guess mode
    controls: list = field(default_factory=list, repr=False)
    guess_mode: bool = False
    finish: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False, compare=False)

    @property
    def img2img(self) -> bool:
        return self.init_image is not None or self.init_latents is not None

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images

    @property
    def guided(self) -> bool:
        # diffusers: classifier-free guidance only when guidance_scale > 1 and the UNet has no guidance input
        return self.guidance > 1.0 and not self.guidance_embedded


@dataclass
class Result:
    images: list[np.ndarray]                # each [H, W, 3] uint8
    request: Request
    latents: np.ndarray                     # final latents before decoding (scaled, as the UNet sees them)
    timings: dict = field(default_factory=dict)  # text_encoder_ms, unet_step_ms (list), vae_encode_ms, vae_decode_ms, total_s


def _texts(what: str, value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise UserError(f"{what} {shown(value)}: must be a string or a non-empty list of strings")


def _per_prompt(what: str, value, n: int) -> list[str]:
    """One text per prompt: a string stands for every prompt, a list must have one per prompt."""
    texts = _texts(what, value)
    if isinstance(value, str):
        return texts * n
    if len(texts) != n:
        raise UserError(f"{what}: {len(texts)} for {n} prompts; give one per prompt")
    return texts


def _pair(what: str, pair) -> tuple[int, int] | None:
    if pair is None:
        return None
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in pair):
        raise UserError(f"{what} {shown(pair)}: must be two integers >= 0 (height, width / top, left)")
    return tuple(pair)


def _is_image_source(value) -> bool:
    """A path or a PIL image (PIL is imported only if the caller already did: it made the image)."""
    if isinstance(value, (str, os.PathLike)):
        return True
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(value, pil.Image)


def refuse_by_model(asked: dict, family: str, img2img: bool) -> None:
    """The family and mode rules of the table: a setting given that this model family or this mode does not
    take is refused in one line."""
    for s in TABLE:
        if s.name in asked and s.given(asked[s.name]):
            why = s.family_refusal(family) or s.mode_refusal(asked[s.name], img2img,
                                                              give="init_image (or init_latents)")
            if why:
                raise UserError(why)


def make_request(pipe, prompt, negative_prompt=None, **asked):
    """``Pipeline.request``: the keyword arguments are its own (see its docstring)."""
    values = {name: SETTING[name].value(asked[name]) for name in
              ("truncate", "weighting", "steps", "guidance", "guidance_rescale", "num_images", "seed", "scheduler")}
    truncate, weighting, steps, guidance, guidance_rescale, num_images, seed, scheduler = values.values()
    prompts = _texts("prompt", prompt)
    negatives = [""] * len(prompts) if negative_prompt is None else \
        _per_prompt("negative_prompt", negative_prompt, len(prompts))
    # diffusers: `prompt_2 or prompt`, so an empty string is the same as none
    prompt_2, negative_prompt_2 = asked["prompt_2"], asked["negative_prompt_2"]
    prompts_2, negatives_2 = (None if v is None or v == "" else _per_prompt(what, v, len(prompts))
                              for what, v in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2)))
    seed = secrets.randbits(63) if seed is None else seed
    m = pipe.model
    init_image, init_latents, strength = asked["init_image"], asked["init_latents"], asked["strength"]
    if init_image is not None and init_latents is not None:
        raise UserError("init_image and init_latents: give one of them")
    img2img = init_image is not None or init_latents is not None
    refuse_by_model(asked, m.family, img2img)
    if len(m.text_encoders or ()) == 1 and (prompts_2 or negatives_2):
        logger.warning("prompt_2 and negative_prompt_2 are ignored: this model's one text encoder reads "
                       "prompt and negative_prompt, as in diffusers")
        prompts_2 = negatives_2 = None
    original_size, crop, target_size = (_pair(what, asked[what]) for what in ("original_size", "crop", "target_size"))
    aesthetic_score, negative_aesthetic_score = (SETTING[what].value(asked[what])
                                                 for what in ("aesthetic_score", "negative_aesthetic_score"))
    denoising = {what: SETTING[what].value(asked[what]) for what in ("denoising_start", "denoising_end")
                 if asked[what] is not None}
    if len(denoising) == 2 and denoising["denoising_start"] >= denoising["denoising_end"]:
        raise UserError(f"denoising_start {asked['denoising_start']:g}: must be below denoising_end "
                        f"{asked['denoising_end']:g}")
    if not img2img and not m.txt2img:
        raise UserError(f"{pipe.engine_dir}: this model ({m.family}) only refines an image; give an init image")
    mask, outpaint = asked["mask"], asked["outpaint"]
    inpaint = None
    if m.inpainting and mask is None and outpaint is None:   # diffusers' inpaint pipelines need image and mask
        raise UserError(f"{pipe.engine_dir}: an inpainting model (its UNet reads a mask); give init_image and mask "
                        "(or outpaint)")
    noise_multiplier = SETTING["noise_multiplier"].value(asked["noise_multiplier"])
    if mask is None and outpaint is None:
        given = [name for name in INPAINT_OPTIONS if SETTING[name].given(asked[name])]
        if given:
            raise UserError(f"{given[0]} {shown(asked[given[0]])}: only inpainting uses it; give mask (and "
                            "init_image) too, or leave it out")
    height, width = (None if asked[what] is None else check_size(what, asked[what], m.size_multiple)
                     for what in ("height", "width"))
    strength_asked = strength is not None
    if init_latents is not None:
        shape = getattr(init_latents, "shape", None)
        f, c = m.vae_scale_factor, m.latent_channels
        if (not isinstance(init_latents, np.ndarray) or init_latents.ndim != 4 or init_latents.dtype.kind != "f"
                or shape[1] != c or shape[0] not in (1, len(prompts) * num_images)):
            raise UserError(f"init_latents {shown(init_latents)}: expected a float [1 or {len(prompts) * num_images}, "
                            f"{c}, H/{f}, W/{f}] array (a Result's latents)")
        lat_h, lat_w = int(shape[2]) * f, int(shape[3]) * f
        if (height or lat_h, width or lat_w) != (lat_h, lat_w):
            raise UserError(f"init_latents are of a {lat_w}x{lat_h} image but {width or lat_w}x{height or lat_h} "
                            "was asked")
        height, width = lat_h, lat_w
        init_latents = np.ascontiguousarray(init_latents, dtype=np.float32)
        strength = SETTING["strength"].value(DEFAULT_STRENGTH if strength is None else strength)
    elif mask is not None or outpaint is not None:
        if init_image is None:
            raise UserError(f"{'mask' if mask is not None else 'outpaint'}: inpainting needs init_image too (the "
                            "picture to repaint)")
        if "denoising_start" in denoising:
            raise UserError("denoising_start with mask: inpainting starts from the init image, not handed-over latents")
        from sdrt.runtime.masks import prepare

        blur = asked["mask_blur"]
        blur = tuple(SETTING["mask_blur"].value(b, "mask_blur") for b in blur) \
            if isinstance(blur, (tuple, list)) and len(blur) == 2 else (SETTING["mask_blur"].value(blur),) * 2
        inpaint = prepare(init_image, mask, height=height, width=width, multiple=m.size_multiple,
                          default_size=(m.default_height, m.default_width), mask_blur=blur,
                          mask_invert=asked["mask_invert"], masked_content=asked["masked_content"],
                          inpaint_area=asked["inpaint_area"], inpaint_padding=asked["inpaint_padding"],
                          overlay=asked["overlay"], outpaint_sides=outpaint)
        height, width = (check_size(what, v, m.size_multiple) for what, v in
                         (("height", inpaint.image.shape[2]), ("width", inpaint.image.shape[3])))
        init_image, mask = inpaint.image, inpaint.mask
        strength = SETTING["strength"].value(pipe.family.inpaint_strength if strength is None else strength)
    elif init_image is None:
        strength = 1.0
        height = m.default_height if height is None else height
        width = m.default_width if width is None else width
    else:
        if _is_image_source(init_image):
            from sdrt.runtime.images import load_init_image

            init_image = load_init_image(init_image, m.vae_scale_factor, height, width)
        strength = SETTING["strength"].value(DEFAULT_STRENGTH if strength is None else strength)
        shape = getattr(init_image, "shape", None)
        if (not isinstance(init_image, np.ndarray) or init_image.ndim != 4 or shape[0] != 1
                or shape[1] != m.image_channels or init_image.dtype.kind != "f"):
            raise UserError(
                f"init_image {shown(init_image)}: expected a path, a PIL image or a float "
                f"[1, {m.image_channels}, H, W] array in [-1, 1] (sdrt.runtime.images.load_init_image makes one)")
        img_h, img_w = check_size("height", int(shape[2]), m.size_multiple), \
            check_size("width", int(shape[3]), m.size_multiple)
        if (height or img_h, width or img_w) != (img_h, img_w):
            raise UserError(
                f"init image is {img_w}x{img_h} but {width or img_w}x{height or img_h} was asked; resize it when "
                "loading (give init_image as a path or PIL image and height/width resize it)")
        height, width = img_h, img_w
    controls = []
    guess_mode = SETTING["guess_mode"].value(asked["guess_mode"])
    if asked["controls"]:
        from sdrt.runtime.control import check_controls

        if pipe.cache_interval is not None:
            raise UserError("controls with cache_interval: feature caching has no ControlNet pair yet; load the "
                            "pipeline without cache_interval")
        controls = check_controls(asked["controls"], pipe.controlnets, height, width, guess_mode)
    if guess_mode and not controls:
        raise UserError("guess_mode: only ControlNets use it; give controls too, or leave it out")
    # validates the name (or the config's own class) and the step count
    sched = make_scheduler(scheduler, pipe.scheduler_config, steps)
    # each refuses a setting that leaves no step to run
    if "denoising_start" in denoising:
        if strength_asked:
            logger.warning("strength is ignored: denoising_start sets where the schedule starts, as in diffusers")
        begin = sched.start_index(denoising["denoising_start"])
    else:
        begin = sched.begin_index(strength) if img2img else 0
    if "denoising_end" in denoising:
        sched.end_index(denoising["denoising_end"], begin)
    embedded = bool(m.guidance_embedding_dim)
    zero_negative = pipe.family.zero_negative(negative_prompt)
    if negatives_2 and zero_negative and guidance > 1.0:
        logger.warning("negative_prompt_2 is ignored without negative_prompt: this checkpoint conditions the "
                       "unguided half on zeros (force_zeros_for_empty_prompt), as diffusers does")
    unguided = "this model takes guidance as an input, with no unguided pass" if embedded else \
        f"guidance {guidance:g} <= 1 runs no unguided pass"
    if ((negative_prompt is not None and any(negatives)) or any(negatives_2 or ())) \
            and (embedded or not guidance > 1.0):
        logger.warning("the negative prompt is ignored: %s", unguided)  # diffusers drops it without a word
    if guidance_rescale > 0 and (embedded or not guidance > 1.0):
        logger.warning("guidance_rescale %g is ignored: %s", guidance_rescale, unguided)
    req = Request(prompts, negatives, steps, guidance, seed, scheduler or "", height, width, num_images,
                  init_image, strength, sched, truncate, weighting, guidance_embedded=embedded,
                  zero_negative=zero_negative, original_size=original_size, crop=crop, target_size=target_size,
                  aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score,
                  guidance_rescale=guidance_rescale, prompts_2=prompts_2, negative_prompts_2=negatives_2,
                  denoising_start=denoising.get("denoising_start"), denoising_end=denoising.get("denoising_end"),
                  init_latents=init_latents, mask=mask, noise_multiplier=noise_multiplier,
                  masked_content=inpaint.masked_content if inpaint else "original",
                  finish=inpaint.finish if inpaint else None, controls=controls, guess_mode=guess_mode)
    if pipe.prompt_reader is not None:
        req.prompt_tokens = pipe.prepare_prompts(req)  # refuses a prompt longer than the engine takes
    return req
