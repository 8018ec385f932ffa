"""Few-step models against diffusers: an LCM-distilled UNet (guidance as its timestep_cond input, LCM scheduler)
as LatentConsistencyModelPipeline runs it, and SD-Turbo / SDXL-Turbo at guidance 0 with 1-4 steps."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from sdrt.runtime.images import images_psnr
from tests.runtime.test_pipeline import PSNR_FLOOR_DB, _reference_images

torch = pytest.importorskip("torch")
from sdrt.bench.reference import diffusers_pipeline  # noqa: E402

PROMPT = "a red circle on a blue background"


class UNetSpy:
    """Records the feeds of every UNet call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def run(self, feeds):
        self.calls.append({k: v.copy() for k, v in feeds.items()})
        return self.inner.run(feeds)


def _spied(pipe):
    spy = UNetSpy(pipe.sessions["unet"])
    copy = type(pipe).__new__(type(pipe))
    copy.__dict__.update(pipe.__dict__)
    copy.sessions = dict(pipe.sessions, unet=spy)
    return copy, spy


@pytest.fixture(scope="module")
def lcm(tiny_model):
    from sdrt.runtime import Pipeline

    model, engine = tiny_model("lcm-tiny")
    return {"pipe": Pipeline(engine), "txt2img": diffusers_pipeline(model),
            "img2img": diffusers_pipeline(model, img2img=True)}


@pytest.mark.parametrize("steps, guidance", [(1, 8.0), (4, 8.0), (4, 1.5)])
def test_lcm_matches_diffusers(lcm, steps, guidance):
    pipe, spy = _spied(lcm["pipe"])
    ours = pipe.generate(PROMPT, steps=steps, guidance=guidance, seed=21, num_images=2)
    ref = _reference_images(lcm["txt2img"], None, prompt=PROMPT, num_inference_steps=steps, guidance_scale=guidance,
                            seed=21, num_images_per_prompt=2)
    for a, b in zip(ours.images, ref):
        assert images_psnr(a, b) >= PSNR_FLOOR_DB
    # guidance goes into the embedding: one UNet pass per step over the images, never a doubled batch
    assert len(spy.calls) == steps
    assert all(c["sample"].shape[0] == 2 and c["timestep_cond"].shape == (2, 16) for c in spy.calls)


def test_lcm_guidance_is_the_embedding(lcm):
    from sdrt.runtime.pipeline import guidance_embedding

    pipe, spy = _spied(lcm["pipe"])
    a = pipe.generate(PROMPT, steps=2, guidance=8.0, seed=3).images[0]
    b = pipe.generate(PROMPT, steps=2, guidance=2.0, seed=3).images[0]
    np.testing.assert_array_equal(spy.calls[0]["timestep_cond"], guidance_embedding(8.0, 16, 1))
    np.testing.assert_array_equal(spy.calls[-1]["timestep_cond"], guidance_embedding(2.0, 16, 1))
    assert images_psnr(a, b) < 60  # a random tiny UNet reads it weakly, but it reads it


def test_lcm_img2img_matches_diffusers(lcm, init_image_path):
    """As StableDiffusionImg2ImgPipeline runs an LCM UNet (not LatentConsistencyModelImg2ImgPipeline, whose
    LCM schedule is itself shortened by the strength)."""
    from PIL import Image

    from sdrt.runtime.images import load_init_image

    pipe = lcm["pipe"]
    init = load_init_image(init_image_path, pipe.model.vae_scale_factor)
    ours = pipe.generate("a green square", steps=4, guidance=6.0, seed=9, init_image=init, strength=0.5)
    ref = _reference_images(lcm["img2img"], None, prompt="a green square", num_inference_steps=4,
                            guidance_scale=6.0, seed=9, image=Image.open(init_image_path).convert("RGB"),
                            strength=0.5)
    assert images_psnr(ours.images[0], ref[0]) >= PSNR_FLOOR_DB


def test_guidance_embedding_equals_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    from sdrt.runtime.pipeline import guidance_embedding

    for dim, guidance in ((16, 8.0), (256, 1.5), (15, 4.0)):
        want = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
            None, torch.tensor(guidance - 1).repeat(3), embedding_dim=dim).numpy()
        # angles reach (guidance - 1) * 1000 radians: torch's vectorized exp is off by an ulp in a rare entry
        np.testing.assert_allclose(guidance_embedding(guidance, dim, 3), want, rtol=0, atol=5e-4)


@pytest.mark.parametrize("kind", ["sd-turbo-tiny", "sdxl-turbo-tiny"])
@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_at_guidance_zero_matches_diffusers(tiny_model, kind, steps):
    from sdrt.runtime import Pipeline

    model, engine = tiny_model(kind)
    pipe, spy = _spied(Pipeline(engine))
    ours = pipe.generate(PROMPT, steps=steps, guidance=0.0, seed=4, num_images=2)
    ref = _reference_images(diffusers_pipeline(model), None, prompt=PROMPT, num_inference_steps=steps,
                            guidance_scale=0.0, seed=4, num_images_per_prompt=2)
    for a, b in zip(ours.images, ref):
        assert images_psnr(a, b) >= PSNR_FLOOR_DB
    # no unconditional pass: one UNet call per step, over the images alone, from the trailing timesteps
    assert len(spy.calls) == steps and all(c["sample"].shape[0] == 2 for c in spy.calls)
    assert spy.calls[0]["timestep"][0] == 999


def test_a_negative_prompt_without_guidance_is_a_one_line_warning(tiny_model, lcm, caplog):
    from sdrt.runtime import Pipeline

    _, engine = tiny_model("sd-turbo-tiny")
    turbo = Pipeline(engine)
    with caplog.at_level(logging.WARNING, logger="sdrt.runtime.pipeline"):
        turbo.request(PROMPT, "blurry", steps=1, guidance=0.0)
        lcm["pipe"].request(PROMPT, "blurry", steps=1, guidance=8.0)
        turbo.request(PROMPT, steps=1, guidance=0.0)  # nothing ignored, nothing said
        turbo.request(PROMPT, "blurry", steps=1, guidance=3.0)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all("\n" not in m for m in messages)
    assert "negative prompt is ignored" in messages[0] and "guidance 0" in messages[0]
    assert "takes guidance as an input" in messages[1]


def test_cli_turbo_guidance_zero_one_step_and_the_refiner_refusal(tiny_model, tmp_path):
    from PIL import Image

    from tests.conftest import assert_one_line_error, run_cli

    _, turbo = tiny_model("sd-turbo-tiny")
    r = run_cli("generate", turbo, PROMPT, "-o", tmp_path / "t.png", "--guidance", "0", "--steps", "1",
                "--negative-prompt", "blurry", "--seed", "1", "-q")
    assert r.returncode == 0, r.stderr
    model = json.loads((turbo / "sdrt.json").read_text())["model"]
    assert Image.open(tmp_path / "t.png").size == (model["default_width"], model["default_height"])
    warnings = [line for line in r.stderr.splitlines() if "negative prompt is ignored" in line]
    assert len(warnings) == 1 and "1 steps" in r.stderr
    _, refiner = tiny_model("sdxl-refiner-tiny")
    assert_one_line_error(run_cli("generate", refiner, PROMPT, "-o", tmp_path / "r.png"),
                          "only refines an image", "init image")
    help_text = run_cli("generate", "--help").stdout
    assert "--guidance 0" in help_text and "LCM" in help_text
