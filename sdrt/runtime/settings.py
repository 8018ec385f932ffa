"""Every request setting, declared once: its name, type, default, allowed values, help, which model families and
modes take it, and what each interface calls it.

The options of ``sdrt generate`` (and those of ``sdrt bench`` that are the same settings), the native request of
``sdrt serve``, ``Pipeline.request``'s checks and the PNG ``parameters`` text are all made from :data:`TABLE`, so
a default or a rule is written in one place. Data and small functions; no model logic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from sdrt.errors import UserError
from sdrt.runtime.families import FAMILIES

REQUIRED = ...   # the default of a setting every request must give (the prompt)
# the SDXL families (sdrt.runtime.families): a pooled text embedding and size/crop/aesthetic time ids
XL = tuple(name for name, f in FAMILIES.items() if "time_ids" in f.unet_conditioning)
IMG2IMG = ("img2img",)
MASKED_CONTENT = ("original", "fill", "latent-noise", "latent-nothing")
INPAINT_AREAS = ("whole", "masked")
# the settings only inpainting reads (with mask, or outpaint)
INPAINT_OPTIONS = ("mask_blur", "mask_invert", "masked_content", "inpaint_area", "inpaint_padding", "overlay")

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
DEFAULT_STRENGTH = 0.8
MAX_SEED = 2**64 - 1
DEFAULT_AESTHETIC_SCORE = 6.0           # diffusers' StableDiffusionXLImg2ImgPipeline defaults (the refiner)
DEFAULT_NEGATIVE_AESTHETIC_SCORE = 2.5


def shown(value) -> str:
    """A value as a one-line error shows it: its repr on one line, cut short (an array by dtype and shape)."""
    if isinstance(value, np.ndarray):
        return f"<{value.dtype} array of shape {list(value.shape)}>"
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _of_type(kind: type, value) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, (int, np.integer))
    if kind is float:
        return isinstance(value, (int, float, np.integer, np.floating)) and bool(np.isfinite(value))
    return isinstance(value, kind)


@dataclass(frozen=True)
class Setting:
    """One request setting. ``check`` holds for the values allowed (of ``type``); ``allowed`` says them as the
    one-line error does ("steps 0: must be an integer >= 1"). ``families``: the model families that take it
    (None: all); ``modes``: txt2img and/or img2img. The interface names: ``native`` (the native JSON field),
    ``flag`` (``sdrt generate``'s option; None: not an option there), ``a1111`` and ``openai`` (their request
    fields, where they have one), ``label`` (the key in the PNG ``parameters`` text). ``bad``: values every
    interface that takes the setting refuses (the tests walk them)."""

    name: str
    type: type
    default: Any
    help: str
    allowed: str = ""
    check: Callable[[Any], bool] | None = None
    families: tuple[str, ...] | None = None
    modes: tuple[str, ...] = ("txt2img", "img2img")
    native: str | None = None
    json: Any = None                 # the native field's type (pydantic annotation); default: ``type``
    api_help: str | None = None      # the native field's description, where it differs from ``help``
    flag: str | None = None
    metavar: str | None = None
    a1111: str | None = None
    openai: str | None = None
    label: str | None = None
    pipeline: bool = True            # a Pipeline.request argument (False: the service's own, e.g. timeout)
    refused_as: str | None = None    # the one-line refusal for a family that does not take it
    bad: tuple = ()

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def value(self, value, what: str | None = None):
        """``value`` checked and converted to ``type`` (None stays None where the default is None), or a
        UserError naming it and what is allowed."""
        if value is None and self.default is None:
            return None
        if not _of_type(self.type, value) or (self.check is not None and not self.check(self.type(value))):
            raise UserError(f"{what or self.name} {shown(value)}: must be {self.allowed}")
        return self.type(value)

    def given(self, value) -> bool:
        """Whether ``value`` asks for something other than the default."""
        return value is not None and not (self.default is not REQUIRED and _same(value, self.default))

    def family_refusal(self, family: str) -> str | None:
        """Why a model of ``family`` refuses this setting (one line), or None when it takes it."""
        if self.families is None or family in self.families:
            return None
        return self.refused_as or f"{self.name}: only {' and '.join(self.families)} models take it"

    def mode_refusal(self, value, img2img: bool, what: str | None = None, give: str = "init_image") -> str | None:
        """Why a request of the other mode refuses ``value`` (one line; ``give`` names the init image as the
        interface spells it), or None."""
        if img2img or "txt2img" in self.modes or not self.given(value):
            return None
        return f"{what or self.name} {shown(value)}: only img2img uses it; give {give} too, or leave it out"


def _same(a, b) -> bool:
    try:
        return bool(a == b) if not isinstance(a, (list, tuple)) else tuple(a) == tuple(b)
    except (TypeError, ValueError):   # an array
        return False


_XL_CONDITIONING = ("original_size, crop, target_size, aesthetic_score and negative_aesthetic_score: only SDXL "
                    "models take them")
_XL_PROMPTS = "prompt_2 and negative_prompt_2: only SDXL models take them (their second text encoder)"

TABLE: tuple[Setting, ...] = (
    Setting("prompt", str, REQUIRED, "what to draw", native="prompt", api_help="", a1111="prompt", openai="prompt",
            bad=(None,)),
    Setting("negative_prompt", str, None, "what to steer away from (used only with guidance > 1; without it an SDXL "
            "model whose checkpoint says force_zeros_for_empty_prompt conditions on zeros)",
            native="negative_prompt", json=str | None, api_help="", flag="--negative-prompt", metavar="TEXT",
            a1111="negative_prompt", openai="negative_prompt", label="Negative prompt", bad=(3,)),
    Setting("prompt_2", str, None, "SDXL base: what the second text encoder (OpenCLIP bigG) reads instead of PROMPT",
            families=XL, native="prompt_2", json=str | None,
            api_help="SDXL base: what the second text encoder reads instead of prompt", flag="--prompt-2",
            metavar="TEXT", refused_as=_XL_PROMPTS, bad=(3,)),
    Setting("negative_prompt_2", str, None, "SDXL base: what the second text encoder reads instead of "
            "--negative-prompt", families=XL, native="negative_prompt_2", json=str | None,
            api_help="SDXL base: the second encoder's negative_prompt", flag="--negative-prompt-2", metavar="TEXT",
            refused_as=_XL_PROMPTS, bad=(3,)),
    Setting("steps", int, DEFAULT_STEPS, "denoising steps (default {default}; few-step models: 1-4, e.g. SD-Turbo "
            "and SDXL-Turbo, LCM)", "an integer >= 1", lambda v: v >= 1, native="steps", api_help="",
            flag="--steps", a1111="steps", openai="steps", label="Steps", bad=(0,)),
    Setting("guidance", float, DEFAULT_GUIDANCE, "classifier-free guidance scale (default {default}). <= 1 disables "
            "it: one UNet pass per step instead of two (Turbo models: --guidance 0). An LCM-distilled model takes it "
            "as an input (its guidance embedding), with one pass per step at any value", "a number >= 0",
            lambda v: v >= 0, native="guidance", api_help="", flag="--guidance", a1111="cfg_scale",
            openai="guidance", label="CFG scale", bad=(-1.0,)),
    Setting("guidance_rescale", float, 0.0, "in [0, 1]: rescale the guided prediction to the spread of the "
            "text-conditioned one, as diffusers' guidance_rescale (against over-exposure; default 0: off; needs "
            "guidance > 1)", "in [0, 1]", lambda v: 0 <= v <= 1, native="guidance_rescale",
            api_help="in [0, 1]: diffusers' guidance_rescale (0: off)", flag="--guidance-rescale", metavar="F",
            label="Guidance rescale", bad=(1.5,)),
    Setting("seed", int, None, "seed (default: random, printed)", "an integer in [0, 2**64)",
            lambda v: 0 <= v <= MAX_SEED, native="seed", json=int | None,
            api_help="default: random (answered in `seeds`)", flag="--seed", a1111="seed", openai="seed",
            label="Seed", bad=(-5,)),
    Setting("scheduler", str, None, "one of {schedulers} (default: the model's own)",
            "a scheduler's name or None (the model's own)", native="scheduler", json=str | None,
            api_help="one of {schedulers}; default: the model's", flag="--scheduler", metavar="NAME",
            a1111="sampler_name", openai="scheduler", label="Sampler", bad=("eular",)),
    Setting("height", int, None, "default: the model's (img2img: the init image's)",
            "a positive multiple of the model's VAE scale factor", native="height", json=int | None,
            api_help="default: the model's (img2img: the init image's)", flag="--height", a1111="height",
            label="Size", bad=(33,)),
    Setting("width", int, None, "", "a positive multiple of the model's VAE scale factor", native="width",
            json=int | None, flag="--width", a1111="width", label="Size", bad=(33,)),
    Setting("num_images", int, 1, "", "an integer >= 1", lambda v: v >= 1, native="num_images", flag="--num-images",
            metavar="N", a1111="batch_size", openai="n", label="Batch size", bad=(0,)),
    Setting("init_image", str, None, "img2img: start from this image", modes=IMG2IMG, native="init_image",
            json=str | None, api_help="img2img: the picture, base64 (a data: URL is fine)", flag="--init-image",
            metavar="PATH", a1111="init_images"),
    Setting("strength", float, None, "img2img: how much to change the image, in (0, 1] (default {strength})",
            "in (0, 1]", lambda v: 0 < v <= 1, modes=IMG2IMG, native="strength", json=float | None,
            api_help="img2img only: how much to change it (default {strength})", flag="--strength",
            a1111="denoising_strength", label="Denoising strength", bad=(0.5, 1.5)),
    # inpainting (sdrt.runtime.masks): diffusers' StableDiffusion(XL)InpaintPipeline, AUTOMATIC1111's options
    Setting("mask", str, None, "inpainting: white in this picture is repainted, black kept (needs --init-image)",
            modes=IMG2IMG, native="mask", json=str | None, api_help="inpainting: the mask, base64; white is repainted",
            flag="--mask", metavar="PATH", a1111="mask"),
    Setting("mask_blur", int, 0, "inpainting: blur the mask by this many pixels, as AUTOMATIC1111 does (default 0)",
            "an integer >= 0", lambda v: v >= 0, modes=IMG2IMG, native="mask_blur", flag="--mask-blur",
            metavar="PX", a1111="mask_blur", label="Mask blur", bad=(-1,)),
    Setting("mask_invert", bool, False, "inpainting: repaint the black of the mask instead of the white",
            "True or False", modes=IMG2IMG, native="mask_invert", flag="--mask-invert", a1111="inpainting_mask_invert",
            bad=("yes",)),
    Setting("masked_content", str, "original", "inpainting: what the repainted area starts from: original (default), "
            "fill (the colours around it), latent-noise, latent-nothing", "one of " + ", ".join(MASKED_CONTENT),
            lambda v: v in MASKED_CONTENT, modes=IMG2IMG, native="masked_content", flag="--masked-content",
            metavar="|".join(MASKED_CONTENT), a1111="inpainting_fill", label="Masked content", bad=("blank",)),
    Setting("inpaint_area", str, "whole", "inpainting: whole (default: the whole picture at the output size) or "
            "masked (a box around the mask at the output size, pasted back)", "one of " + ", ".join(INPAINT_AREAS),
            lambda v: v in INPAINT_AREAS, modes=IMG2IMG, native="inpaint_area", flag="--inpaint-area",
            metavar="whole|masked", a1111="inpaint_full_res", label="Inpaint area", bad=("all",)),
    Setting("inpaint_padding", int, 32, "inpainting with --inpaint-area masked: pixels around the mask in the box "
            "(default {default})", "an integer >= 0", lambda v: v >= 0, modes=IMG2IMG, native="inpaint_padding",
            flag="--inpaint-padding", metavar="PX", a1111="inpaint_full_res_padding", label="Masked area padding",
            bad=(-4,)),
    Setting("overlay", bool, False, "inpainting: paste the original back outside the mask, as AUTOMATIC1111 always "
            "does (default off: the pictures equal diffusers')", "True or False", modes=IMG2IMG, native="overlay",
            flag="--overlay", bad=("yes",)),
    Setting("outpaint", str, None, "extend the canvas by LEFT,RIGHT,TOP,BOTTOM pixels and paint the new border "
            "(needs --init-image)", "LEFT,RIGHT,TOP,BOTTOM, four integers >= 0", modes=IMG2IMG, native="outpaint",
            json=str | None, api_help="LEFT,RIGHT,TOP,BOTTOM pixels to add and paint around init_image",
            flag="--outpaint", metavar="L,R,T,B", bad=("1,2,3",)),
    Setting("noise_multiplier", float, 1.0, "img2img and inpainting: scale the noise added to the init image, as "
            "AUTOMATIC1111's initial noise multiplier (default 1)", "a number in (0, 2]", lambda v: 0 < v <= 2,
            modes=IMG2IMG, native="noise_multiplier", flag="--noise-multiplier", metavar="F",
            a1111="initial_noise_multiplier", label="Noise multiplier", bad=(0.0, 3.0)),
    # ControlNets (sdrt.runtime.control): diffusers' StableDiffusionControlNetPipeline, MultiControlNetModel
    Setting("controls", list, None, "a ControlNet or T2I-Adapter of the engine (`sdrt export --controlnet`), "
            "NAME:IMAGE[:SCALE[:START:END]]: its conditioning picture, scale (default 1, up to 2) and the fraction of "
            "the schedule it acts in (default 0:1); repeatable (their residuals add up; ControlNets or adapters, "
            "not both)", native="controls", json=list[dict[str, Any]] | None,
            api_help="ControlNets / T2I-Adapters: [{{name, image (base64), scale, start, end}}]",
            flag="--control", metavar="NAME:IMAGE[:SCALE[:START:END]]", bad=("nothing:x.png",)),
    Setting("guess_mode", bool, False, "ControlNets see only the conditional half, their residuals scaled 0.1 to 1 "
            "by depth (diffusers' guess_mode)", "True or False", native="guess_mode", flag="--guess-mode",
            label="Guess mode", bad=("yes",)),
    Setting("timeout", float, None, "", native="timeout", json=float | None,
            api_help="seconds; at most the service's --timeout", pipeline=False, bad=(1e9,)),
    Setting("preview_every", int, 0, "", native="preview_every",
            api_help="job events: a preview PNG every N steps (0: none)", pipeline=False, bad=(-1,)),
    Setting("truncate", bool, False, "cut prompts at 75 tokens as diffusers does (default: longer prompts are read "
            "in chunks of 75)", "True or False", native="truncate",
            api_help="cut prompts at 75 tokens as diffusers does (default: chunks)", flag="--truncate", bad=("yes",)),
    Setting("weighting", bool, True, "read (, ), [, ] and BREAK literally (default: (word:1.3), (word), [word] and "
            "BREAK as AUTOMATIC1111 reads them)", "True or False", native="weighting",
            api_help="read (word:1.3), (word), [word] and BREAK as AUTOMATIC1111 does", flag="--no-weighting",
            label="Emphasis", bad=("yes",)),
    # SDXL's size and crop conditioning, the refiner's aesthetic scores, the base + refiner handoff: Python only
    Setting("original_size", tuple, None, "SDXL: the size conditioning, (height, width) in pixels (default: the "
            "output size)", "two integers >= 0", families=XL, refused_as=_XL_CONDITIONING, bad=((64, 64, 64),)),
    Setting("crop", tuple, (0, 0), "SDXL: the crop conditioning, (top, left) in pixels", "two integers >= 0",
            families=XL, refused_as=_XL_CONDITIONING, bad=((1, 2, 3),)),
    Setting("target_size", tuple, None, "SDXL: the target size conditioning, (height, width) in pixels (default: "
            "the output size)", "two integers >= 0", families=XL, refused_as=_XL_CONDITIONING, bad=((-1, 5),)),
    Setting("aesthetic_score", float, DEFAULT_AESTHETIC_SCORE, "SDXL refiner: the aesthetic score conditioning",
            "a number", families=XL, refused_as=_XL_CONDITIONING, bad=("high",)),
    Setting("negative_aesthetic_score", float, DEFAULT_NEGATIVE_AESTHETIC_SCORE, "SDXL refiner: the unguided "
            "half's aesthetic score", "a number", families=XL, refused_as=_XL_CONDITIONING, bad=("low",)),
    Setting("denoising_start", float, None, "SDXL refiner: start this far through the schedule, from the base's "
            "latents", "in (0, 1)", lambda v: 0 < v < 1, families=XL, modes=IMG2IMG,
            refused_as="denoising_start: only SDXL models take it (the base + refiner handoff)", bad=(1.0,)),
    Setting("denoising_end", float, None, "SDXL base: stop this far through the schedule (the latents are then "
            "still noisy)", "in (0, 1)", lambda v: 0 < v < 1, families=XL,
            refused_as="denoising_end: only SDXL models take it (the base + refiner handoff)", bad=(1.0,)),
    Setting("init_latents", np.ndarray, None, "img2img from latents (a Result's latents: the base's, for the "
            "refiner)", modes=IMG2IMG),
)
SETTING: dict[str, Setting] = {s.name: s for s in TABLE}


def check_size(what: str, value, multiple: int) -> int:
    """The one rule for heights and widths: a positive multiple of the model's VAE scale factor."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0 or value % multiple:
        raise UserError(f"{what} {shown(value)}: must be a positive multiple of {multiple} for this model "
                        "(its VAE scale factor)")
    return int(value)


def _help(s: Setting, text: str, default=None) -> str:
    from sdrt.runtime.schedulers import SCHEDULER_NAMES

    return text.format(default=s.default if default is None else default, strength=DEFAULT_STRENGTH,
                       schedulers=", ".join(SCHEDULER_NAMES))


def native_help(s: Setting) -> str | None:
    """The native field's description (None: none)."""
    return _help(s, s.help if s.api_help is None else s.api_help) or None


def add_options(parser, names: Iterable[str], defaults: dict | None = None,
                table: dict[str, Setting] = SETTING) -> None:
    """Add the options of the settings ``names`` (of ``table``) to an argparse parser, each with the setting's
    name as its dest. ``defaults``: another command's own defaults for some (`sdrt bench --steps`); a help that
    does not say its default then says only that."""
    for name in names:
        s = table[name]
        default = (defaults or {}).get(name, s.default)
        own = default != s.default and "{default" not in s.help
        text = f"default {default}" if own else (_help(s, s.help, default) or None)
        if s.type is bool:
            parser.add_argument(s.flag, dest=s.name, action="store_false" if s.default else "store_true",
                                default=s.default, help=text)
        elif s.type is list:   # repeatable
            parser.add_argument(s.flag, dest=s.name, action="append", default=s.default, metavar=s.metavar, help=text)
        else:
            parser.add_argument(s.flag, dest=s.name, type=s.type, default=default, metavar=s.metavar, help=text)


# the PNG parameters: settings that add a label only when they differ from the default, with the text they show
_SHOWN_WHEN_GIVEN = {"weighting": lambda v: "None", "guidance_rescale": lambda v: v, "noise_multiplier": lambda v: v,
                     "masked_content": lambda v: v}


def request_parameters(req, scheduler: str, model: str, index: int = 0) -> str:
    """The PNG ``parameters`` text (AUTOMATIC1111's layout) of image ``index`` of a checked Request; the one
    writer for ``sdrt generate`` and the service. ``scheduler``: its name (the model's own when the request
    named none)."""
    from sdrt.runtime.images import format_parameters

    extra: dict[str, object] = {}
    if req.batch > 1:
        extra.update({SETTING["num_images"].label: req.batch, "Batch pos": index})
    for name, text in _SHOWN_WHEN_GIVEN.items():
        value = getattr(req, name)
        if SETTING[name].given(value):
            extra[SETTING[name].label] = text(value)
    for i, c in enumerate(req.controls):   # as AUTOMATIC1111's ControlNet extension writes its units
        extra[f"ControlNet {i}"] = (f"Model: {c.name}, Weight: {c.scale:g}, Guidance Start: {c.start:g}, Guidance End: "
                                    f"{c.end:g}" + (", Control Mode: ControlNet is more important"
                                                    if req.guess_mode else ""))
    return format_parameters(
        prompt=req.prompts[0], negative_prompt=req.negative_prompts[0], steps=req.steps,
        scheduler=req.scheduler or scheduler, guidance=req.guidance, seed=req.seed, height=req.height,
        width=req.width, model=model, strength=req.strength if req.init_image is not None else None,
        extra=extra or None)
