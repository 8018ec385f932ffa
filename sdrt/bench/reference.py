"""The diffusers reference, for `sdrt bench` and the tests: the pipeline and scheduler each sdrt name stands for (needs torch)."""

from __future__ import annotations

SCHEDULER_CLASSES = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler",
                 {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


def diffusers_scheduler(name: str | None, config: dict):
    """diffusers' scheduler for an sdrt scheduler name (None: the config's own class)."""
    import diffusers

    if name is None:
        return getattr(diffusers, config["_class_name"]).from_config(config)
    cls, overrides = SCHEDULER_CLASSES[name]
    return getattr(diffusers, cls).from_config(config, **overrides)


def diffusers_pipeline(model_dir, img2img: bool = False):
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls.from_pretrained(model_dir, torch_dtype=torch.float32, safety_checker=None,
                               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
