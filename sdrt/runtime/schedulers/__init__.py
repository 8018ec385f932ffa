"""Torch-free numpy schedulers, each equal to a diffusers scheduler made with ``from_config``.

``make_scheduler(name, config, num_inference_steps)`` builds one from a model's ``scheduler_config.json``;
``name=None`` means the model's own scheduler (the config's ``_class_name``). See ``base.py`` for the loop.
"""

from __future__ import annotations

import operator

from sdrt.errors import UserError

from ._config import resolve
from .alpha import DDIM, DDPM, LCM
from .base import Scheduler
from .multistep import DPMSolverPP2M, UniPC
from .pndm import PNDM
from .sigma import LMS, Euler, EulerAncestral, Heun

__all__ = ["SCHEDULER_NAMES", "Scheduler", "make_scheduler", "scheduler_name_for_config", "steps_phrase"]

# name -> (diffusers class whose from_config it equals, constructor overrides, our implementation)
_REGISTRY = {
    "ddim": ("DDIMScheduler", {}, DDIM),
    "pndm": ("PNDMScheduler", {}, PNDM),
    "ddpm": ("DDPMScheduler", {}, DDPM),
    "lms": ("LMSDiscreteScheduler", {}, LMS),
    "euler": ("EulerDiscreteScheduler", {}, Euler),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, EulerAncestral),
    "heun": ("HeunDiscreteScheduler", {}, Heun),
    "dpmpp_2m": ("DPMSolverMultistepScheduler",
                 {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}, DPMSolverPP2M),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
                        DPMSolverPP2M),
    "unipc": ("UniPCMultistepScheduler", {}, UniPC),
    "lcm": ("LCMScheduler", {}, LCM),
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(_REGISTRY)

_BY_CLASS = {cls: name for name, (cls, overrides, _) in _REGISTRY.items() if not overrides}


def scheduler_name_for_config(config: dict) -> str:
    """The sdrt name of the scheduler a ``scheduler_config.json`` describes."""
    class_name = config.get("_class_name")
    if class_name is None:
        raise UserError(f"the scheduler config names no _class_name; choose a scheduler: {', '.join(SCHEDULER_NAMES)}")
    if class_name == "DPMSolverMultistepScheduler":
        algorithm = config.get("algorithm_type", "dpmsolver++")
        order = int(config.get("solver_order", 2))
        if algorithm not in ("dpmsolver++", "deis") or order != 2:
            raise UserError(
                f"scheduler DPMSolverMultistepScheduler with algorithm_type={algorithm!r}, solver_order={order} "
                f"is not supported; choose one of: {', '.join(SCHEDULER_NAMES)}"
            )
        return "dpmpp_2m_karras" if config.get("use_karras_sigmas") else "dpmpp_2m"
    if class_name not in _BY_CLASS:
        raise UserError(
            f"the model's scheduler {class_name!r} is not supported; choose one of: {', '.join(SCHEDULER_NAMES)}"
        )
    return _BY_CLASS[class_name]


def make_scheduler(name: str | None, config: dict, num_inference_steps: int) -> Scheduler:
    """A scheduler for ``num_inference_steps`` steps, equal to diffusers' ``Class.from_config(config)``."""
    if name is None:
        name = scheduler_name_for_config(config)
    if name not in _REGISTRY:
        raise UserError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULER_NAMES)}")
    try:
        steps = operator.index(num_inference_steps) if not isinstance(num_inference_steps, bool) else None
    except TypeError:
        steps = None
    if steps is None or steps < 1:
        raise UserError(f"number of inference steps {num_inference_steps!r} is invalid; use an integer >= 1")
    class_name, overrides, implementation = _REGISTRY[name]
    return implementation(resolve(class_name, config, overrides), steps)


def steps_phrase(steps: int, unet_evaluations: int) -> str:
    """"25 steps", or "25 steps (26 UNet evaluations)" where they differ: PNDM evaluates its first timestep twice,
    Heun evaluates every step but the last twice, img2img runs only the tail of the schedule."""
    if steps == unet_evaluations:
        return f"{steps} steps"
    return f"{steps} steps ({unet_evaluations} UNet evaluation{'s' if unet_evaluations != 1 else ''})"
