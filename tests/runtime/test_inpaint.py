"""Inpainting and outpainting through the torch-free runtime against diffusers' inpaint pipelines (same seed,
same picture), the mask preparation against diffusers' own processors, and the one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from sdrt.errors import UserError
from sdrt.runtime.images import images_psnr
from tests.conftest import assert_one_line_error, run_cli

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from sdrt.bench.reference import diffusers_scheduler  # noqa: E402

PSNR_FLOOR_DB = 40
H, W = 24, 40     # non-square, a multiple of every tiny VAE's factor
PROMPT, NEGATIVE = "a red fox in the snow", "blurry"


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A structured picture and a mask (white: repaint) with a box and a disc, as files."""
    base = tmp_path_factory.mktemp("inpaint")
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.stack([(xx * 6) % 256, (yy * 9) % 256, ((xx + 2 * yy) * 4) % 256], axis=-1).astype(np.uint8)
    mask = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(mask)
    draw.rectangle([6, 4, 17, 15], fill=255)
    draw.ellipse([24, 8, 33, 19], fill=255)
    Image.fromarray(rgb).save(base / "picture.png")
    mask.save(base / "mask.png")
    return base / "picture.png", base / "mask.png"


@pytest.fixture(scope="module")
def models(tiny_model, model_dirs, engine_dirs):
    """kind -> (model dir, engine dir): 9-channel SD1 and SDXL, and the 4-channel SD1 and SD2 (v-prediction)."""
    out = {kind: tiny_model(kind) for kind in ("sd1-inpaint-tiny", "sdxl-inpaint-tiny")}
    out.update({kind: (model_dirs[kind], engine_dirs[kind]) for kind in ("sd1-tiny", "sd2-tiny")})
    return out


def _diffusers(kind, model_dir):
    cls = diffusers.StableDiffusionXLInpaintPipeline if "xl" in kind else diffusers.StableDiffusionInpaintPipeline
    extra = {} if "xl" in kind else dict(safety_checker=None, requires_safety_checker=False)
    pipe = cls.from_pretrained(model_dir, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(pipe, scheduler, picture, seed=3, steps=5, strength=None, **kw):
    image, mask = (Image.open(p) for p in picture)
    pipe.scheduler = diffusers_scheduler(scheduler, dict(pipe.scheduler.config))
    extra = {} if strength is None else {"strength": strength}
    out = pipe(PROMPT, negative_prompt=NEGATIVE, image=image, mask_image=mask, height=H, width=W,
               num_inference_steps=steps, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(seed),
               output_type="pil", **extra, **kw).images[0]   # PIL: the pixels diffusers hands its users
    return np.asarray(out.convert("RGB"))


CASES = [(kind, scheduler, strength) for kind in ("sd1-inpaint-tiny", "sdxl-inpaint-tiny", "sd1-tiny", "sd2-tiny")
         for scheduler, strength in (("euler_a", 1.0), ("dpmpp_2m", 0.6))]


@pytest.mark.parametrize("kind, scheduler, strength", CASES)
def test_inpainting_equals_diffusers(models, picture, kind, scheduler, strength):
    from sdrt.runtime import Pipeline

    model, engine = models[kind]
    ours = Pipeline(engine).generate(PROMPT, negative_prompt=NEGATIVE, init_image=picture[0], mask=picture[1],
                                     steps=5, guidance=7.5, seed=3, scheduler=scheduler, strength=strength,
                                     height=H, width=W).images[0]
    want = _reference(_diffusers(kind, model), scheduler, picture, strength=strength)
    assert images_psnr(ours, want) >= PSNR_FLOOR_DB


def test_the_default_strength_is_the_familys(models, picture):
    """diffusers' defaults: 1.0 for SD, 0.9999 for SDXL (which then starts from the noised picture)."""
    from sdrt.runtime import Pipeline

    for kind, strength in (("sd1-inpaint-tiny", 1.0), ("sdxl-inpaint-tiny", 0.9999)):
        req = Pipeline(models[kind][1]).request(PROMPT, init_image=picture[0], mask=picture[1], steps=4)
        assert req.strength == strength
    model, engine = models["sdxl-inpaint-tiny"]
    ours = Pipeline(engine).generate(PROMPT, negative_prompt=NEGATIVE, init_image=picture[0], mask=picture[1],
                                     steps=5, seed=3, height=H, width=W).images[0]
    assert images_psnr(ours, _reference(_diffusers("sdxl-inpaint-tiny", model), None, picture)) >= PSNR_FLOOR_DB


def test_only_masked_equals_diffusers_padding_mask_crop(models, picture):
    from sdrt.runtime import Pipeline

    model, engine = models["sd1-inpaint-tiny"]
    ours = Pipeline(engine).generate(PROMPT, negative_prompt=NEGATIVE, init_image=picture[0], mask=picture[1],
                                     steps=5, seed=3, scheduler="euler", height=H, width=W, inpaint_area="masked",
                                     inpaint_padding=2).images[0]
    want = _reference(_diffusers("sd1-inpaint-tiny", model), "euler", picture, padding_mask_crop=2)
    assert ours.shape == want.shape == (H, W, 3)
    assert images_psnr(ours, want) >= PSNR_FLOOR_DB


def test_overlay_and_outpaint_keep_the_original_outside_the_mask(models, picture):
    from sdrt.runtime import Pipeline

    pipe = Pipeline(models["sd1-tiny"][1])
    original = np.asarray(Image.open(picture[0]).convert("RGB"))
    keep = np.asarray(Image.open(picture[1])) == 0
    out = pipe.generate(PROMPT, init_image=picture[0], mask=picture[1], steps=3, seed=1, overlay=True).images[0]
    np.testing.assert_array_equal(out[keep], original[keep])
    assert not np.array_equal(out[~keep], original[~keep])
    plain = pipe.generate(PROMPT, init_image=picture[0], mask=picture[1], steps=3, seed=1).images[0]
    assert not np.array_equal(plain[keep], original[keep])        # diffusers' default: the VAE's round trip
    wide = pipe.generate(PROMPT, init_image=picture[0], outpaint="4,8,2,6", steps=3, seed=1, overlay=True).images[0]
    assert wide.shape == (H + 8, W + 12, 3)
    np.testing.assert_array_equal(wide[2:2 + H, 4:4 + W], original)   # only the new border was painted


def test_masked_content_changes_only_what_starts_under_the_mask(models, picture):
    from sdrt.runtime import Pipeline

    pipe = Pipeline(models["sd1-tiny"][1])
    kw = dict(init_image=picture[0], mask=picture[1], steps=4, seed=5, strength=0.5)
    results = {c: pipe.generate(PROMPT, masked_content=c, **kw).images[0]
               for c in ("original", "fill", "latent-noise", "latent-nothing")}
    for content in ("fill", "latent-noise", "latent-nothing"):
        assert images_psnr(results[content], results["original"]) < 60, content
    assert pipe.request(PROMPT, masked_content="fill", **kw).masked_content == "fill"


def test_the_service_paths_batch_inpainting_with_other_requests(models, picture):
    """An inpainting request shares UNet calls with a txt2img one (4-channel blending) and gives the picture
    Pipeline.generate gives."""
    from sdrt.runtime import Pipeline
    from sdrt.serve import Engine

    engine_dir = models["sd1-tiny"][1]
    kw = dict(init_image=str(picture[0]), mask=str(picture[1]), steps=6, seed=2, scheduler="ddim")
    alone = Pipeline(engine_dir).generate(PROMPT, **kw).images[0]
    pipe = Pipeline(engine_dir)
    calls = []
    run = pipe.sessions["unet"].run
    pipe.sessions["unet"].run = lambda feeds: (calls.append(len(feeds["sample"])), run(feeds))[1]
    engine = Engine(pipe, max_batch=4).start(warmup=False)
    try:
        jobs = [engine.submit(PROMPT, **kw), engine.submit("a cat", steps=6, seed=9, height=H, width=W)]
        served = jobs[0].wait(120).images[0]
        jobs[1].wait(120)
    finally:
        engine.close()
    assert images_psnr(served, alone) >= 60 and max(calls) == 4


def test_a_single_file_inpainting_checkpoint_exports_like_its_folder(models, tmp_path, picture):
    from sdrt.runtime import Pipeline
    from tools.to_single_file import to_single_file

    model, engine = models["sd1-inpaint-tiny"]
    single = to_single_file(model, tmp_path / "inpaint.safetensors")
    r = run_cli("export", single, tmp_path / "engine", "-q", "--config", model)   # the tiny model's own configs
    assert r.returncode == 0, r.stderr
    kw = dict(init_image=picture[0], mask=picture[1], steps=3, seed=4, height=H, width=W)
    a = Pipeline(tmp_path / "engine").generate(PROMPT, **kw).images[0]
    b = Pipeline(engine).generate(PROMPT, **kw).images[0]
    assert Pipeline(tmp_path / "engine").model.unet_in_channels == 9 and images_psnr(a, b) >= 60


# ---- refusals ----------------------------------------------------------------------------------------------

def test_bad_inpainting_input_is_one_line(models, picture, tmp_path):
    from sdrt.runtime import Pipeline

    pipe = Pipeline(models["sd1-tiny"][1])
    inpainter = Pipeline(models["sd1-inpaint-tiny"][1])
    black = tmp_path / "black.png"
    Image.new("L", (W, H), 0).save(black)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    cases = [
        (lambda: pipe.request(PROMPT, mask=picture[1]), "mask"),
        (lambda: pipe.request(PROMPT, init_image=picture[0], mask=broken), "cannot be read"),
        (lambda: pipe.request(PROMPT, init_image=picture[0], mask=tmp_path / "nope.png"), "no such file"),
        (lambda: pipe.request(PROMPT, init_image=picture[0], mask=black), "all black"),
        (lambda: pipe.request(PROMPT, init_image=picture[0], mask_blur=4), "only inpainting uses it"),
        (lambda: pipe.request(PROMPT, init_image=picture[0], mask=picture[1], masked_content="blank"),
         "masked_content 'blank'"),
        (lambda: pipe.request(PROMPT, init_image=picture[0], outpaint="1,2,3"), "LEFT,RIGHT,TOP,BOTTOM"),
        (lambda: inpainter.request(PROMPT), "an inpainting model"),
        (lambda: inpainter.request(PROMPT, init_image=picture[0]), "give init_image and mask"),
    ]
    for ask, needle in cases:
        with pytest.raises(UserError) as e:
            ask()
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_generate_cli_inpaints_and_refuses_in_one_line(models, picture, tmp_path):
    engine = models["sd1-tiny"][1]
    out = tmp_path / "o.png"
    r = run_cli("generate", engine, PROMPT, "-o", out, "-q", "--init-image", picture[0], "--mask", picture[1],
                "--steps", "3", "--seed", "1", "--overlay", "--mask-blur", "2")
    assert r.returncode == 0, r.stderr
    original = np.asarray(Image.open(picture[0]).convert("RGB"))
    got = np.asarray(Image.open(out).convert("RGB"))
    # the blur's kernel reaches 2 * int(2.5 * 2 + 0.5) / 2 = 5 pixels out: beyond that, the original
    far = np.asarray(Image.open(picture[1]).filter(ImageFilter.MaxFilter(13))) == 0
    np.testing.assert_array_equal(got[far], original[far])   # outside the blurred mask: the original
    assert_one_line_error(run_cli("generate", engine, PROMPT, "--mask", picture[1]), "mask", "init_image")
    assert_one_line_error(run_cli("generate", engine, PROMPT, "--init-image", picture[0], "--mask", picture[1],
                                  "--masked-content", "blank"), "masked_content 'blank'", "fill")
