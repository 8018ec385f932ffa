"""SDXL (base, refiner) through the torch-free runtime against diffusers' SDXL pipelines: same seed, same image."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdrt.errors import UserError
from sdrt.runtime.images import images_psnr
from sdrt.runtime.schedulers import SCHEDULER_NAMES
from tests.runtime.test_pipeline import PSNR_FLOOR_DB, _reference_images

torch = pytest.importorskip("torch")
from sdrt.bench.reference import diffusers_pipeline  # noqa: E402

STEPS = {"heun": 3, "lcm": 4}  # others: 5
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def sdxl(tiny_model):
    from sdrt.runtime import Pipeline

    model, engine = tiny_model("sdxl-tiny")
    return {"pipe": Pipeline(engine), "txt2img": diffusers_pipeline(model),
            "img2img": diffusers_pipeline(model, img2img=True), "model": model, "engine": engine}


@pytest.fixture(scope="module")
def refiner(tiny_model):
    from sdrt.runtime import Pipeline

    model, engine = tiny_model("sdxl-refiner-tiny")
    return {"pipe": Pipeline(engine), "img2img": diffusers_pipeline(model, img2img=True), "engine": engine}


def _init(path, pipe):
    from sdrt.runtime.images import load_init_image

    return load_init_image(path, pipe.model.vae_scale_factor)


def test_manifest_records_both_encoders_and_the_conditioning(sdxl, refiner):
    m = json.loads((sdxl["engine"] / "sdrt.json").read_text())["model"]
    cfg = {c: json.loads((sdxl["model"] / c / "config.json").read_text())
           for c in ("text_encoder", "text_encoder_2", "unet", "vae")}
    assert m["family"] == "sdxl" and m["txt2img"] is True
    first, second = m["text_encoders"]
    assert (first["component"], second["component"]) == ("text_encoder", "text_encoder_2")
    assert (first["hidden_size"], second["hidden_size"]) == (cfg["text_encoder"]["hidden_size"],
                                                             cfg["text_encoder_2"]["hidden_size"]) == (32, 48)
    assert (first["pad_token"], second["pad_token"]) == ("<|endoftext|>", "!")
    assert (first["pad_token_id"], second["pad_token_id"]) == (49407, 0)
    assert m["text_hidden_size"] == cfg["unet"]["cross_attention_dim"] == 80
    assert m["pooled_dim"] == second["projection_dim"] == cfg["text_encoder_2"]["projection_dim"] == 24
    assert m["time_ids"] == ["original_height", "original_width", "crop_top", "crop_left", "target_height",
                             "target_width"]
    assert m["force_zeros_for_empty_prompt"] is True
    assert m["scaling_factor"] == cfg["vae"]["scaling_factor"] and m["force_upcast"] is True
    r = json.loads((refiner["engine"] / "sdrt.json").read_text())
    assert r["model"]["family"] == "sdxl-refiner" and r["model"]["txt2img"] is False
    assert [e["component"] for e in r["model"]["text_encoders"]] == ["text_encoder_2"]
    assert r["model"]["time_ids"][-1] == "aesthetic_score" and len(r["model"]["time_ids"]) == 5
    assert r["model"]["force_zeros_for_empty_prompt"] is False
    assert set(r["components"]) == {"text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    unet_inputs = [i["name"] for i in r["components"]["unet"]["inputs"]]
    assert unet_inputs == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_txt2img_matches_diffusers(sdxl, scheduler):
    steps = STEPS.get(scheduler, 5)
    ours = sdxl["pipe"].generate(PROMPT, "blurry", steps=steps, guidance=6.0, seed=1234, scheduler=scheduler,
                                 num_images=2)
    ref = _reference_images(sdxl["txt2img"], scheduler, prompt=PROMPT, negative_prompt="blurry",
                            num_inference_steps=steps, guidance_scale=6.0, seed=1234, num_images_per_prompt=2)
    assert len(ours.images) == 2 and ours.images[0].shape == ref[0].shape
    for a, b in zip(ours.images, ref):
        assert images_psnr(a, b) >= PSNR_FLOOR_DB, scheduler
    assert images_psnr(ours.images[0], ours.images[1]) < 30


def test_no_negative_prompt_is_zeros_and_size_conditioning_counts(sdxl):
    """force_zeros_for_empty_prompt: no negative prompt conditions on zeros, an empty one on the encoded "";
    original size, crop and target size change the image as they change diffusers'."""
    pipe, settings = sdxl["pipe"], dict(steps=4, guidance=6.0, seed=5, scheduler="euler")
    zeros = pipe.generate(PROMPT, None, **settings).images[0]
    empty = pipe.generate(PROMPT, "", **settings).images[0]
    assert images_psnr(zeros, empty) < 35
    for neg, ours in ((None, zeros), ("", empty)):
        ref = _reference_images(sdxl["txt2img"], "euler", prompt=PROMPT, negative_prompt=neg, num_inference_steps=4,
                                guidance_scale=6.0, seed=5)
        assert images_psnr(ours, ref[0]) >= PSNR_FLOOR_DB, neg
    sizes = dict(original_size=(64, 48), crop=(8, 4), target_size=(40, 24))
    ours = pipe.generate(PROMPT, **sizes, **settings).images[0]
    ref = _reference_images(sdxl["txt2img"], "euler", prompt=PROMPT, num_inference_steps=4, guidance_scale=6.0,
                            seed=5, original_size=sizes["original_size"], crops_coords_top_left=sizes["crop"],
                            target_size=sizes["target_size"])
    assert images_psnr(ours, ref[0]) >= PSNR_FLOOR_DB
    assert images_psnr(ours, zeros) < 50  # a random tiny UNet reads its time ids weakly, but it reads them
    time_ids = pipe.start(pipe.request(PROMPT, **sizes, **settings)).unet_inputs()["time_ids"]
    np.testing.assert_array_equal(time_ids, [[64, 48, 8, 4, 40, 24]] * 2)  # [unguided, guided] rows


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_img2img_matches_diffusers(sdxl, init_image_path, scheduler):
    from PIL import Image

    pipe = sdxl["pipe"]
    steps = STEPS.get(scheduler, 5) * 2
    ours = pipe.generate("a green square", steps=steps, guidance=5.0, seed=7, scheduler=scheduler,
                         init_image=_init(init_image_path, pipe), strength=0.6)
    ref = _reference_images(sdxl["img2img"], scheduler, prompt="a green square",
                            image=Image.open(init_image_path).convert("RGB"), strength=0.6,
                            num_inference_steps=steps, guidance_scale=5.0, seed=7)
    assert ours.images[0].shape == ref[0].shape
    assert images_psnr(ours.images[0], ref[0]) >= PSNR_FLOOR_DB, scheduler


@pytest.mark.parametrize("scheduler", [None, "euler_a", "dpmpp_2m", "heun"])
def test_refiner_matches_diffusers(refiner, init_image_path, scheduler):
    from PIL import Image

    pipe = refiner["pipe"]
    steps = STEPS.get(scheduler, 5) * 2
    settings = dict(steps=steps, guidance=5.0, seed=11, scheduler=scheduler, strength=0.5, num_images=2)
    ours = pipe.generate("a green square", "blurry", init_image=_init(init_image_path, pipe), crop=(4, 2),
                         **settings)
    ref = _reference_images(refiner["img2img"], scheduler, prompt="a green square", negative_prompt="blurry",
                            image=Image.open(init_image_path).convert("RGB"), strength=0.5,
                            num_inference_steps=steps, guidance_scale=5.0, seed=11, num_images_per_prompt=2,
                            crops_coords_top_left=(4, 2))
    for a, b in zip(ours.images, ref):
        assert images_psnr(a, b) >= PSNR_FLOOR_DB, scheduler


def test_refiner_reads_aesthetic_scores(refiner, init_image_path):
    pipe = refiner["pipe"]
    init = _init(init_image_path, pipe)
    settings = dict(steps=4, guidance=5.0, seed=11, init_image=init, strength=0.5)
    req = pipe.request("a green square", crop=(4, 2), aesthetic_score=7.0, **settings)
    h, w = init.shape[-2:]
    # unguided rows: the negative score and no crop (diffusers' negative_crops_coords_top_left), then guided
    np.testing.assert_array_equal(pipe.start(req).unet_inputs()["time_ids"], [[h, w, 0, 0, 2.5], [h, w, 4, 2, 7.0]])
    a = pipe.generate("a green square", **settings).images[0]
    b = pipe.generate("a green square", aesthetic_score=1.0, **settings).images[0]
    assert images_psnr(a, b) < 50  # a random tiny UNet reads its time ids weakly, but it reads them


def test_refiner_refuses_txt2img_in_one_line(refiner):
    with pytest.raises(UserError, match="only refines an image; give an init image") as e:
        refiner["pipe"].request("a cat")
    assert "\n" not in str(e.value)


def test_size_conditioning_is_sdxl_only(sd1_engine):
    from sdrt.runtime import Pipeline

    with pytest.raises(UserError, match="only SDXL models take them"):
        Pipeline(sd1_engine).request("x", original_size=(64, 64))


def test_unet_inputs_batch_along_the_first_axis(sdxl):
    """Every UNet feed (text_embeds and time_ids too) has the request's UNet batch first, so the serving
    engine can concatenate several requests' feeds and split the output."""
    pipe = sdxl["pipe"]
    a = pipe.start(pipe.request(PROMPT, "blurry", steps=3, guidance=6.0, seed=1, num_images=2))
    b = pipe.start(pipe.request("a cat", steps=3, guidance=1.0, seed=2))
    for loop in (a, b):
        feeds = loop.unet_inputs()
        assert set(feeds) == {"sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"}
        assert {v.shape[0] for v in feeds.values()} == {loop.unet_batch}
    assert a.unet_batch == 4 and b.unet_batch == 1
    fa, fb = a.unet_inputs(), b.unet_inputs()
    joint = {k: np.concatenate([fa[k], fb[k]]) for k in fa}
    out = pipe.sessions["unet"].run(joint)["out_sample"]
    alone = pipe.sessions["unet"].run(fb)["out_sample"]
    np.testing.assert_allclose(out[4:], alone, rtol=1e-4, atol=1e-5)


def test_rescale_guided_is_diffusers_rescale_noise_cfg():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    from sdrt.runtime.pipeline import rescale_guided

    rng = np.random.default_rng(0)
    guided = rng.standard_normal((3, 4, 8, 6), dtype=np.float32) * np.float32([[[[3.0]]], [[[1.0]]], [[[0.5]]]])
    text = rng.standard_normal((3, 4, 8, 6), dtype=np.float32)
    for factor in (0.0, 0.7, 1.0):
        ref = rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(text), guidance_rescale=factor).numpy()
        np.testing.assert_allclose(rescale_guided(guided, text, factor), ref, rtol=1e-5, atol=1e-6)
    # per sample: each of the three gets the text prediction's spread (with factor 1), not a batch-wide one
    np.testing.assert_allclose(rescale_guided(guided, text, 1.0).std(axis=(1, 2, 3), ddof=1),
                               text.std(axis=(1, 2, 3), ddof=1), rtol=1e-5)


def test_guidance_rescale_matches_diffusers(sdxl, caplog):
    import logging

    pipe, settings = sdxl["pipe"], dict(steps=4, guidance=9.0, seed=7, scheduler="euler")
    plain = pipe.generate(PROMPT, "blurry", **settings).images[0]
    ours = pipe.generate(PROMPT, "blurry", guidance_rescale=0.7, **settings).images[0]
    ref = _reference_images(sdxl["txt2img"], "euler", prompt=PROMPT, negative_prompt="blurry", num_inference_steps=4,
                            guidance_scale=9.0, seed=7, guidance_rescale=0.7)
    match, moved = images_psnr(ours, ref[0]), images_psnr(ours, plain)
    assert match >= PSNR_FLOOR_DB
    # the rescale moved the image (a random tiny UNet reads guidance weakly) far more than sdrt differs from diffusers
    assert moved < 60 and match > moved + 10, (match, moved)
    with pytest.raises(UserError, match=r"^guidance_rescale 1\.5: must be in \[0, 1\]$"):
        pipe.request(PROMPT, guidance_rescale=1.5)
    with caplog.at_level(logging.WARNING, logger="sdrt.runtime.pipeline"):
        pipe.request(PROMPT, guidance=1.0, guidance_rescale=0.5)
    assert [r.getMessage() for r in caplog.records] == [
        "guidance_rescale 0.5 is ignored: guidance 1 <= 1 runs no unguided pass"]


def test_second_prompts_match_diffusers(sdxl):
    """prompt_2 / negative_prompt_2 reach the second encoder only, as in diffusers; "" means the same prompt."""
    pipe, settings = sdxl["pipe"], dict(steps=4, guidance=6.0, seed=11, scheduler="euler")
    kw = dict(prompt_2="a green square, sharp", negative_prompt_2="noisy, dark")
    ours = pipe.generate(PROMPT, "blurry", **kw, **settings).images[0]
    ref = _reference_images(sdxl["txt2img"], "euler", prompt=PROMPT, negative_prompt="blurry", num_inference_steps=4,
                            guidance_scale=6.0, seed=11, **kw)
    same = pipe.generate(PROMPT, "blurry", **settings).images[0]
    match, moved = images_psnr(ours, ref[0]), images_psnr(ours, same)
    assert match >= PSNR_FLOOR_DB and match > moved + 10, (match, moved)
    req = pipe.request(PROMPT, "blurry", **kw, **settings)
    assert pipe.text_inputs(req) == [PROMPT, "blurry"]
    assert pipe.text_inputs(req, second=True) == [kw["prompt_2"], kw["negative_prompt_2"]]
    empty = pipe.request(PROMPT, "blurry", prompt_2="", **settings)
    assert pipe.text_inputs(empty, second=True) == [PROMPT, "blurry"]
    with pytest.raises(UserError, match=r"^prompt_2: 1 for 2 prompts; give one per prompt$"):
        pipe.request([PROMPT, PROMPT], prompt_2=["one"])


def test_second_prompts_are_sdxl_base_only(sdxl, refiner, sd1_engine, init_image_path, caplog):
    import logging

    from sdrt.runtime import Pipeline

    with pytest.raises(UserError, match=r"^prompt_2 and negative_prompt_2: only SDXL models take them"):
        Pipeline(sd1_engine).request(PROMPT, prompt_2="x")
    with caplog.at_level(logging.WARNING, logger="sdrt.runtime.pipeline"):
        req = refiner["pipe"].request(PROMPT, prompt_2="x", init_image=init_image_path, steps=4)
        assert req.prompts_2 is None
        # force_zeros_for_empty_prompt: without negative_prompt, diffusers conditions on zeros regardless
        req = sdxl["pipe"].request(PROMPT, negative_prompt_2="noisy", guidance=6.0)
        assert req.zero_negative and sdxl["pipe"].text_inputs(req, second=True) == [PROMPT]
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "prompt_2 and negative_prompt_2 are ignored", "negative_prompt_2 is ignored without negative_prompt"]


def _diffusers_latents_or_images(ref, name, **kw):
    from sdrt.bench.reference import diffusers_scheduler

    if not hasattr(ref, "sdrt_original_scheduler_config"):
        ref.sdrt_original_scheduler_config = dict(ref.scheduler.config)
    ref.scheduler = diffusers_scheduler(name, ref.sdrt_original_scheduler_config)
    return ref(generator=torch.Generator("cpu").manual_seed(kw.pop("seed")), **kw).images


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "dpmpp_2m", "heun"])
def test_base_then_refiner_hand_off_as_in_diffusers(sdxl, refiner, scheduler):
    """denoising_end on the base, its latents and denoising_start on the refiner: the same split of one schedule,
    the same latents and image as diffusers' base(output_type="latent") -> refiner(image=latents)."""
    steps, split = 8, 0.7
    settings = dict(steps=steps, guidance=6.0, scheduler=scheduler)
    base = sdxl["pipe"].generate(PROMPT, "blurry", seed=3, denoising_end=split, **settings)
    ours = refiner["pipe"].generate(PROMPT, "blurry", seed=4, denoising_start=split, init_latents=base.latents,
                                    **settings)
    kw = dict(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=steps, guidance_scale=6.0)
    ref_latents = _diffusers_latents_or_images(sdxl["txt2img"], scheduler, seed=3, denoising_end=split,
                                               output_type="latent", **kw).numpy()
    ref = _diffusers_latents_or_images(refiner["img2img"], scheduler, seed=4, image=torch.from_numpy(base.latents),
                                       denoising_start=split, output_type="np", **kw)
    rel = np.linalg.norm(base.latents - ref_latents) / np.linalg.norm(ref_latents)
    assert rel < 1e-3, rel
    assert images_psnr(ours.images[0], (ref[0] * 255).round().astype(np.uint8)) >= PSNR_FLOOR_DB
    # the two runs split the schedule: together they make the UNet calls one full run makes, each some (diffusers'
    # refiner takes one call more with a second-order scheduler, so that it starts on a whole step)
    calls = len(sdxl["pipe"].request(PROMPT, **settings).schedule.timesteps) + (scheduler == "heun")
    base_calls, ref_calls = len(base.timings["unet_step_ms"]), len(ours.timings["unet_step_ms"])
    assert base_calls >= 1 and ref_calls >= 1 and base_calls + ref_calls == calls, (base_calls, ref_calls, calls)


def test_handoff_settings_are_checked(sdxl, refiner, sd1_engine, caplog):
    import logging

    from sdrt.runtime import Pipeline

    base, ref = sdxl["pipe"], refiner["pipe"]
    latents = np.zeros((1, 4, 16, 16), np.float32)
    with pytest.raises(UserError, match=r"^denoising_end: only SDXL models take it"):
        Pipeline(sd1_engine).request(PROMPT, denoising_end=0.8)
    with pytest.raises(UserError, match=r"^denoising_end 1\.0: must be in \(0, 1\)$"):
        base.request(PROMPT, denoising_end=1.0)
    with pytest.raises(UserError, match=r"^denoising_start 0\.8: only img2img uses it"):
        base.request(PROMPT, denoising_start=0.8)
    with pytest.raises(UserError, match=r"^denoising_start 0\.8: must be below denoising_end 0\.5$"):
        ref.request(PROMPT, init_latents=latents, denoising_start=0.8, denoising_end=0.5)
    with pytest.raises(UserError, match=r"^init_latents <float32 array of shape \[1, 3, 16, 16\]>: expected"):
        ref.request(PROMPT, init_latents=np.zeros((1, 3, 16, 16), np.float32), denoising_start=0.8)
    with pytest.raises(UserError, match=r"^denoising_start 0\.999 with 4 steps leaves no step to run"):
        ref.request(PROMPT, init_latents=latents, denoising_start=0.999, steps=4)
    with caplog.at_level(logging.WARNING, logger="sdrt.runtime.pipeline"):
        req = ref.request(PROMPT, init_latents=latents, denoising_start=0.5, strength=0.3, steps=4)
    assert (req.height, req.width) == (32, 32) and req.img2img
    assert [r.getMessage() for r in caplog.records] == [
        "strength is ignored: denoising_start sets where the schedule starts, as in diffusers"]
