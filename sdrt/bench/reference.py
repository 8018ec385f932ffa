"""The diffusers reference, for `sdrt bench` and the tests: the pipeline and scheduler each sdrt name stands for (needs torch)."""

from __future__ import annotations

import json
from pathlib import Path

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

# the checkpoint's pipeline class -> (txt2img class, img2img class, extra from_pretrained arguments)
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                                {"safety_checker": None, "requires_safety_checker": False}),
    # img2img of an LCM UNet as StableDiffusionImg2ImgPipeline runs it (the usual schedule cut by strength);
    # LatentConsistencyModelImg2ImgPipeline shortens the LCM schedule itself, which sdrt does not do
    "LatentConsistencyModelPipeline": ("LatentConsistencyModelPipeline", "StableDiffusionImg2ImgPipeline",
                                       {"safety_checker": None, "requires_safety_checker": False}),
    # no invisible watermark: it changes the pixels (diffusers adds it when the package is installed)
    "StableDiffusionXLPipeline": ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                                  {"add_watermarker": False}),
}
PIPELINE_CLASSES["StableDiffusionImg2ImgPipeline"] = PIPELINE_CLASSES["StableDiffusionPipeline"]
PIPELINE_CLASSES["StableDiffusionXLImg2ImgPipeline"] = PIPELINE_CLASSES["StableDiffusionXLPipeline"]


def diffusers_scheduler(name: str | None, config: dict):
    """diffusers' scheduler for an sdrt scheduler name (None: the config's own class)."""
    import diffusers

    if name is None:
        return getattr(diffusers, config["_class_name"]).from_config(config)
    cls, overrides = SCHEDULER_CLASSES[name]
    return getattr(diffusers, cls).from_config(config, **overrides)


def diffusers_pipeline(model_dir, img2img: bool = False, dtype=None):
    """The diffusers pipeline the checkpoint's model_index names (SD, LCM or SDXL), for txt2img or img2img."""
    import diffusers
    import torch

    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    txt2img, image2image, kwargs = PIPELINE_CLASSES[index.get("_class_name") or "StableDiffusionPipeline"]
    cls = getattr(diffusers, image2image if img2img else txt2img)
    pipe = cls.from_pretrained(model_dir, dtype=dtype or torch.float32, **kwargs)  # torch_dtype is deprecated
    pipe.set_progress_bar_config(disable=True)
    return pipe
