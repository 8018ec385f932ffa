"""ControlNets and T2I-Adapters through the whole torch-free pipeline against diffusers' own pipelines, same seed:
SDXL with a ControlNet (StableDiffusionXLControlNetPipeline), SD2 v-prediction with a ControlNet, T2I-Adapters on SD1 and SDXL
(StableDiffusion(XL)AdapterPipeline, the SDXL one with adapter_conditioning_factor), a ControlNet with img2img and
with inpainting (StableDiffusionControlNetImg2ImgPipeline / ControlNetInpaintPipeline), and the service batching
requests that need different UNet graphs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdrt.runtime.images import images_psnr
from tests.conftest import served_with_calls

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from sdrt.bench.reference import diffusers_scheduler  # noqa: E402

H, W = 24, 40
PROMPT, NEGATIVE = "a red fox in the snow", "blurry"
FLOOR_DB = 40


def _picture(path, seed: int):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 5, 30, 22), fill=(250, 250, 250))   # structure: a block the control can follow
    image.save(path)
    return path


@pytest.fixture(scope="module")
def sd1_adapter(sd1_model, tmp_path_factory):
    """sd1-tiny exported with a T2I-Adapter named sketch."""
    from sdrt.export import export_model
    from tools.make_models import make_t2i_adapter

    base = tmp_path_factory.mktemp("adapter")
    adapter = make_t2i_adapter(sd1_model, base / "sketch", seed=2)
    engine = base / "engine"
    export_model(sd1_model, engine, progress=False, log=lambda m: None, controlnets=[f"{adapter}:sketch"])
    return {"model": sd1_model, "engine": engine, "adapter": adapter, "picture": _picture(base / "c.png", 5)}


@pytest.fixture(scope="module")
def sdxl_controls(tmp_path_factory):
    """sdxl-tiny exported with a ControlNet (canny) and a T2I-Adapter (sketch)."""
    from sdrt.export import export_model
    from tools.make_models import make_controlnet, make_model, make_t2i_adapter

    base = tmp_path_factory.mktemp("sdxl-controls")
    model = make_model("sdxl-tiny", base / "xl", seed=0)
    cn, adapter = make_controlnet(model, base / "cn", seed=1), make_t2i_adapter(model, base / "ad", seed=2)
    engine = base / "engine"
    export_model(model, engine, progress=False, log=lambda m: None, controlnets=[f"{cn}:canny", f"{adapter}:sketch"])
    return {"model": model, "engine": engine, "cn": cn, "adapter": adapter, "picture": _picture(base / "c.png", 6)}


def _ready(pipe, scheduler):
    pipe.set_progress_bar_config(disable=True)
    if scheduler:
        pipe.scheduler = diffusers_scheduler(scheduler, dict(pipe.scheduler.config))
    return pipe


def _pixels(out) -> np.ndarray:
    return np.asarray(out.images[0].convert("RGB"))


@pytest.mark.parametrize("scheduler, guess", [("euler_a", False), ("dpmpp_2m", True)])
def test_sdxl_controlnet_equals_diffusers(sdxl_controls, scheduler, guess):
    from sdrt.runtime import Pipeline

    c = sdxl_controls
    ours = Pipeline(c["engine"]).generate(
        PROMPT, negative_prompt=NEGATIVE, steps=5, guidance=6.0, seed=7, scheduler=scheduler, height=H, width=W,
        controls=[("canny", c["picture"], 0.7, 0.0, 0.8)], guess_mode=guess).images[0]
    net = diffusers.ControlNetModel.from_pretrained(c["cn"])
    ref = _ready(diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(c["model"], controlnet=net), scheduler)
    want = _pixels(ref(PROMPT, negative_prompt=NEGATIVE, image=Image.open(c["picture"]), num_inference_steps=5,
                       guidance_scale=6.0, height=H, width=W, generator=torch.Generator("cpu").manual_seed(7),
                       controlnet_conditioning_scale=0.7, control_guidance_end=0.8, guess_mode=guess))
    assert images_psnr(ours, want) >= FLOOR_DB
    plain = Pipeline(c["engine"]).generate(PROMPT, negative_prompt=NEGATIVE, steps=5, guidance=6.0, seed=7,
                                           scheduler=scheduler, height=H, width=W).images[0]
    assert images_psnr(plain, want) < images_psnr(ours, want) - 10   # the ControlNet made the difference


def test_sd2_v_prediction_controlnet_equals_diffusers(sd2_model, tmp_path):
    """SD2.x (v-prediction, 1024-wide context in the full model) with a ControlNet made for it."""
    from sdrt.export import export_model
    from sdrt.runtime import Pipeline
    from tools.make_models import make_controlnet

    net = make_controlnet(sd2_model, tmp_path / "net", seed=3)
    engine = tmp_path / "engine"
    export_model(sd2_model, engine, progress=False, log=lambda m: None, controlnets=[f"{net}:lines"])
    picture = _picture(tmp_path / "c.png", 7)
    ours = Pipeline(engine).generate(PROMPT, negative_prompt=NEGATIVE, steps=5, guidance=7.5, seed=8,
                                     scheduler="dpmpp_2m", height=H, width=W,
                                     controls=[("lines", picture, 0.9, 0.0, 0.8)]).images[0]
    ref = _ready(diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        sd2_model, controlnet=diffusers.ControlNetModel.from_pretrained(net), safety_checker=None,
        requires_safety_checker=False), "dpmpp_2m")
    want = _pixels(ref(PROMPT, negative_prompt=NEGATIVE, image=Image.open(picture), num_inference_steps=5,
                       guidance_scale=7.5, height=H, width=W, generator=torch.Generator("cpu").manual_seed(8),
                       controlnet_conditioning_scale=0.9, control_guidance_end=0.8))
    assert images_psnr(ours, want) >= FLOOR_DB


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_sd1_t2i_adapter_equals_diffusers(sd1_adapter, scale):
    from sdrt.runtime import Pipeline

    a = sd1_adapter
    pipe = Pipeline(a["engine"])
    ours = pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=5, guidance=7.5, seed=3, scheduler="euler",
                         height=H, width=W, controls=[("sketch", a["picture"], scale)]).images[0]
    adapter = diffusers.T2IAdapter.from_pretrained(a["adapter"])
    ref = _ready(diffusers.StableDiffusionAdapterPipeline.from_pretrained(
        a["model"], adapter=adapter, safety_checker=None, requires_safety_checker=False), "euler")
    want = _pixels(ref(PROMPT, negative_prompt=NEGATIVE, image=Image.open(a["picture"]), num_inference_steps=5,
                       guidance_scale=7.5, height=H, width=W, generator=torch.Generator("cpu").manual_seed(3),
                       adapter_conditioning_scale=scale))
    assert images_psnr(ours, want) >= FLOOR_DB
    assert "unet_adapter" in pipe.sessions and "unet_control" not in pipe.sessions
    plain = pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=5, guidance=7.5, seed=3, scheduler="euler",
                          height=H, width=W).images[0]
    assert images_psnr(plain, want) < images_psnr(ours, want) - 10


def test_sdxl_t2i_adapter_with_conditioning_factor_equals_diffusers(sdxl_controls):
    """The SDXL adapter pipeline's adapter_conditioning_factor f is the window 0..f (the first int(steps * f)
    steps)."""
    from sdrt.runtime import Pipeline

    c = sdxl_controls
    ours = Pipeline(c["engine"]).generate(
        PROMPT, negative_prompt=NEGATIVE, steps=6, guidance=5.0, seed=2, scheduler="euler", height=H, width=W,
        controls=[{"name": "sketch", "image": str(c["picture"]), "scale": 0.9, "end": 0.5}]).images[0]
    adapter = diffusers.T2IAdapter.from_pretrained(c["adapter"])
    ref = _ready(diffusers.StableDiffusionXLAdapterPipeline.from_pretrained(c["model"], adapter=adapter), "euler")
    want = _pixels(ref(PROMPT, negative_prompt=NEGATIVE, image=Image.open(c["picture"]), num_inference_steps=6,
                       guidance_scale=5.0, height=H, width=W, generator=torch.Generator("cpu").manual_seed(2),
                       adapter_conditioning_scale=0.9, adapter_conditioning_factor=0.5))
    assert images_psnr(ours, want) >= FLOOR_DB


def test_controlnet_img2img_equals_diffusers(controlled):
    from sdrt.runtime import Pipeline

    init, cond = controlled["pictures"]
    ours = Pipeline(controlled["engine"]).generate(
        PROMPT, negative_prompt=NEGATIVE, init_image=init, strength=0.7, steps=6, guidance=7.5, seed=4,
        scheduler="dpmpp_2m", height=H, width=W, controls=[("edges", cond, 0.9, 0.1, 1.0)]).images[0]
    net = diffusers.ControlNetModel.from_pretrained(controlled["nets"]["edges"])
    ref = _ready(diffusers.StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
        controlled["model"], controlnet=net, safety_checker=None, requires_safety_checker=False), "dpmpp_2m")
    want = _pixels(ref(PROMPT, negative_prompt=NEGATIVE, image=Image.open(init),
                       control_image=Image.open(cond), strength=0.7, num_inference_steps=6, guidance_scale=7.5,
                       height=H, width=W, generator=torch.Generator("cpu").manual_seed(4),
                       controlnet_conditioning_scale=0.9, control_guidance_start=0.1))
    assert images_psnr(ours, want) >= FLOOR_DB


def test_controlnet_inpainting_equals_diffusers(controlled, tmp_path):
    """A 4-channel model with a mask and a ControlNet: StableDiffusionControlNetInpaintPipeline (blending)."""
    from sdrt.runtime import Pipeline

    init, cond = controlled["pictures"]
    mask = Image.new("L", (W, H), 0)
    ImageDraw.Draw(mask).ellipse((8, 4, 30, 20), fill=255)
    mask.save(tmp_path / "mask.png")
    ours = Pipeline(controlled["engine"]).generate(
        PROMPT, negative_prompt=NEGATIVE, init_image=init, mask=tmp_path / "mask.png", steps=5, guidance=7.5,
        seed=6, scheduler="euler_a", height=H, width=W, controls=[("depth", cond, 1.1)]).images[0]
    net = diffusers.ControlNetModel.from_pretrained(controlled["nets"]["depth"])
    ref = _ready(diffusers.StableDiffusionControlNetInpaintPipeline.from_pretrained(
        controlled["model"], controlnet=net, safety_checker=None, requires_safety_checker=False), "euler_a")
    want = _pixels(ref(PROMPT, negative_prompt=NEGATIVE, image=Image.open(init), mask_image=mask,
                       control_image=Image.open(cond), num_inference_steps=5, guidance_scale=7.5, height=H, width=W,
                       generator=torch.Generator("cpu").manual_seed(6), controlnet_conditioning_scale=1.1))
    assert images_psnr(ours, want) >= FLOOR_DB


def test_requests_needing_different_unet_graphs_share_a_step(sdxl_controls):
    """In the service, a ControlNet request, an adapter request and a plain one step together: one call of each
    UNet graph the step needs (the plain request rides in the ControlNet's call, with zeros), and every picture
    equals the same request run alone."""
    from sdrt.runtime import Pipeline

    c = sdxl_controls
    asks = [dict(prompt=PROMPT, steps=4, seed=1, height=H, width=W, controls=[("canny", str(c["picture"]), 0.8)]),
            dict(prompt="a cat", steps=4, seed=2, height=H, width=W, controls=[("sketch", str(c["picture"]))]),
            dict(prompt="a dog", steps=4, seed=3, height=H, width=W)]
    alone = [Pipeline(c["engine"]).generate(**a).images[0] for a in asks]
    pipe = Pipeline(c["engine"])
    pipe.generate(**asks[0])
    pipe.generate(**asks[1])   # every session loaded, so the engine's calls can be counted
    served, calls = served_with_calls(pipe, asks, ("unet", "unet_control", "unet_adapter"))
    for a, b in zip(served, alone):
        assert images_psnr(a, b) >= 60
    assert ("unet_control", 4) in calls and ("unet_adapter", 2) in calls
