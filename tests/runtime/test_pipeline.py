"""The torch-free pipeline against diffusers: same seed, same image (PSNR >= 40 dB), for every scheduler."""

from __future__ import annotations

import concurrent.futures as cf
import json

import numpy as np
import pytest

from sdrt.errors import StageError, UserError
from sdrt.runtime.images import images_psnr
from sdrt.runtime.schedulers import SCHEDULER_NAMES

torch = pytest.importorskip("torch")
from sdrt.bench.reference import diffusers_pipeline, diffusers_scheduler  # noqa: E402

PSNR_FLOOR_DB = 40.0
STEPS = {"heun": 4, "lcm": 4}  # others: 6


@pytest.fixture(scope="session")
def pipes(engine_dirs):
    from sdrt.runtime import Pipeline

    return {kind: Pipeline(path) for kind, path in engine_dirs.items()}


@pytest.fixture(scope="session")
def references(model_dirs):
    return {kind: {"txt2img": diffusers_pipeline(path), "img2img": diffusers_pipeline(path, img2img=True)}
            for kind, path in model_dirs.items()}


def _reference_images(ref, name, **kw):
    # always from the model's own config: a previous test's scheduler config must not leak into this one
    if not hasattr(ref, "sdrt_original_scheduler_config"):
        ref.sdrt_original_scheduler_config = dict(ref.scheduler.config)
    ref.scheduler = diffusers_scheduler(name, ref.sdrt_original_scheduler_config)
    out = ref(generator=torch.Generator("cpu").manual_seed(kw.pop("seed")), output_type="np", **kw).images
    return (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize("kind", ["sd1-tiny", "sd2-tiny"])
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_txt2img_matches_diffusers(pipes, references, kind, scheduler):
    steps = STEPS.get(scheduler, 6)
    ours = pipes[kind].generate("a red circle on a blue background", "blurry", steps=steps, guidance=7.5,
                                seed=1234, scheduler=scheduler, num_images=2)
    ref = _reference_images(references[kind]["txt2img"], scheduler, prompt="a red circle on a blue background",
                            negative_prompt="blurry", num_inference_steps=steps, guidance_scale=7.5, seed=1234,
                            num_images_per_prompt=2)
    assert len(ours.images) == 2 and ours.images[0].shape == ref[0].shape
    for a, b in zip(ours.images, ref):
        assert images_psnr(a, b) >= PSNR_FLOOR_DB, scheduler
    # the two images of one call differ (each has its own noise), so the comparison is not trivially equal
    assert images_psnr(ours.images[0], ours.images[1]) < 30


@pytest.mark.parametrize("kind", ["sd1-tiny", "sd2-tiny"])
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_img2img_matches_diffusers(pipes, references, init_image_path, kind, scheduler):
    from PIL import Image

    from sdrt.runtime.images import load_init_image

    pipe = pipes[kind]
    steps = STEPS.get(scheduler, 6) * 2
    init = load_init_image(init_image_path, pipe.model.vae_scale_factor)
    ours = pipe.generate("a green square", steps=steps, guidance=5.0, seed=7, scheduler=scheduler,
                         init_image=init, strength=0.6)
    ref = _reference_images(references[kind]["img2img"], scheduler, prompt="a green square",
                            image=Image.open(init_image_path).convert("RGB"), strength=0.6,
                            num_inference_steps=steps, guidance_scale=5.0, seed=7)
    assert ours.images[0].shape == ref[0].shape
    assert images_psnr(ours.images[0], ref[0]) >= PSNR_FLOOR_DB, scheduler
    # img2img runs only the tail of the schedule, as diffusers' get_timesteps cuts it
    sched = references[kind]["img2img"].scheduler
    sched.set_timesteps(steps)
    t_start = steps - min(int(steps * 0.6), steps)
    assert len(ours.timings["unet_step_ms"]) == len(sched.timesteps) - t_start * sched.order


def test_without_guidance_matches_diffusers(pipes, references):
    ours = pipes["sd1-tiny"].generate("a cat", steps=5, guidance=1.0, seed=3)
    ref = _reference_images(references["sd1-tiny"]["txt2img"], None, prompt="a cat", num_inference_steps=5,
                            guidance_scale=1.0, seed=3)
    assert images_psnr(ours.images[0], ref[0]) >= PSNR_FLOOR_DB


def test_model_default_size_and_other_sizes(pipes):
    pipe = pipes["sd2-tiny"]
    m = pipe.model
    assert pipe.generate("x", steps=2, seed=0).images[0].shape == (m.default_height, m.default_width, 3)
    h, w = m.default_height + m.size_multiple, m.default_width - m.size_multiple
    assert pipe.generate("x", steps=2, seed=0, height=h, width=w).images[0].shape == (h, w, 3)


def test_one_pipeline_serves_eight_threads(pipes):
    pipe = pipes["sd1-tiny"]
    jobs = [dict(prompt=f"prompt number {i}", seed=100 + i, steps=3, scheduler=s)
            for i, s in enumerate(["euler_a", "ddim", "dpmpp_2m", "pndm"] * 2)]
    serial = [pipe.generate(**j).images[0] for j in jobs]
    with cf.ThreadPoolExecutor(8) as ex:
        threaded = list(ex.map(lambda j: pipe.generate(**j).images[0], jobs))
    for a, b in zip(serial, threaded):
        np.testing.assert_array_equal(a, b)
    assert len({a.tobytes() for a in serial}) == len(serial)


@pytest.mark.parametrize("settings, needle", [
    (dict(height=33), "height 33"),
    (dict(width=31), "multiple of"),
    (dict(steps=0), "steps 0"),
    (dict(guidance=-1.0), "guidance -1.0"),
    (dict(num_images=0), "num_images 0"),
    (dict(scheduler="nope"), "choose one of: ddim"),
    (dict(seed=-5), "seed -5"),
])
def test_bad_settings_are_named(pipes, settings, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        pipes["sd1-tiny"].request("x", **settings)


# every public argument of Pipeline.request, with values of the wrong type (or out of range) for it
WRONG = {
    "prompt": [None, 3, b"bytes", [], ["a", 3], {"a": 1}, np.zeros((2, 2))],
    "negative_prompt": [3, ["a", "b"], [None], ("a", 3)],
    "steps": ["5", 2.5, None, True, -1, [5]],
    "guidance": ["7.5", None, float("nan"), float("inf"), -1, True, [7.5], 1j],
    "seed": ["1", 1.5, -1, 2**64, True, np.float32(3)],
    "scheduler": [3, ["euler"], "eular"],
    "height": ["32", 32.0, 33, 0, -32, True, np.float64(32)],
    "width": ["32", 31, [32]],
    "num_images": ["2", 0, 2.0, True, None],
    "init_image": [3, [[0.0]], np.zeros((32, 32, 3), np.uint8), np.zeros((1, 3, 32, 32), np.int64),
                   "/nonexistent/x.png", b"/bytes/path"],
    "strength": ["0.5", float("nan"), 0, 1.5, True],
}
NAMED_AS = {"init_image": "init"}


@pytest.mark.parametrize("argument, value", [(a, v) for a, values in WRONG.items() for v in values],
                         ids=lambda x: " ".join(repr(x).split())[:30])
def test_every_wrong_argument_is_a_one_line_user_error_naming_it(pipes, init_image_path, argument, value):
    pipe = pipes["sd1-tiny"]
    kwargs = {"prompt": "x", argument: value}
    if argument == "strength":
        kwargs["init_image"] = init_image_path
    with pytest.raises(UserError) as info:
        pipe.request(**kwargs)
    message = str(info.value)
    assert NAMED_AS.get(argument, argument) in message and "\n" not in message and len(message) < 300, message


def test_generate_checks_its_own_arguments(pipes):
    pipe = pipes["sd1-tiny"]
    with pytest.raises(UserError, match="prompt None: must be a string"):
        pipe.generate(None)
    with pytest.raises(UserError, match="unknown setting 'stpes'; the settings are: steps, guidance"):
        pipe.generate("x", stpes=3)
    with pytest.raises(UserError, match="callback 3"):
        pipe.generate("x", steps=1, callback=3)
    with pytest.raises(UserError, match="strength 0.5: only img2img"):
        pipe.generate("x", steps=1, strength=0.5)


def test_init_image_as_a_path_or_a_pil_image_equals_the_loaded_array(pipes, init_image_path):
    from PIL import Image

    from sdrt.runtime.images import load_init_image

    pipe = pipes["sd1-tiny"]
    kw = dict(steps=4, seed=3, strength=0.5)
    loaded = load_init_image(init_image_path, pipe.model.vae_scale_factor, 24, 32)
    want = pipe.generate("x", init_image=loaded, **kw).images[0]
    from_path = pipe.generate("x", init_image=str(init_image_path), height=24, width=32, **kw).images[0]
    with Image.open(init_image_path) as image:
        from_pil = pipe.generate("x", init_image=image, height=24, width=32, **kw).images[0]
    assert want.shape == (24, 32, 3)
    np.testing.assert_array_equal(from_path, want)
    np.testing.assert_array_equal(from_pil, want)


def test_bad_strength_is_named(pipes, init_image_path):
    from sdrt.runtime.images import load_init_image

    pipe = pipes["sd1-tiny"]
    init = load_init_image(init_image_path, pipe.model.vae_scale_factor)
    for s in (0.0, 1.5, -0.1):
        with pytest.raises(UserError, match=f"strength {s}"):
            pipe.request("x", init_image=init, strength=s)
    with pytest.raises(UserError, match="strength 0.01 with 10 steps"):
        pipe.request("x", init_image=init, strength=0.01, steps=10)


def test_nan_out_of_a_stage_is_an_error_naming_it(pipes):
    pipe = pipes["sd1-tiny"]

    class Poisoned:
        def __init__(self, inner):
            self.inner = inner

        def run(self, feeds):
            out = self.inner.run(feeds)
            return {k: np.full_like(v, np.nan) for k, v in out.items()}

    real = pipe.sessions["unet"]
    pipe_copy = type(pipe).__new__(type(pipe))
    pipe_copy.__dict__.update(pipe.__dict__)
    pipe_copy.sessions = dict(pipe.sessions, unet=Poisoned(real))
    with pytest.raises(StageError, match="unet produced NaN or inf at step 1"):
        pipe_copy.generate("x", steps=2, seed=0)
    pipe_copy.sessions = dict(pipe.sessions, vae_decoder=Poisoned(pipe.sessions["vae_decoder"]))
    with pytest.raises(StageError, match="vae_decoder"):
        pipe_copy.generate("x", steps=1, seed=0)


def test_corrupt_engine_directory_names_the_component(sd1_engine, tmp_path):
    import shutil

    from sdrt.runtime import Pipeline

    broken = tmp_path / "engine"
    shutil.copytree(sd1_engine, broken)
    (broken / "unet" / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(UserError, match="unet"):
        Pipeline(broken)
    (broken / "unet" / "model.onnx").unlink()
    with pytest.raises(UserError, match="unet.*missing"):
        Pipeline(broken)
    m = json.loads((broken / "sdrt.json").read_text())
    m["format_version"] = 99
    (broken / "sdrt.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="format_version 99"):
        Pipeline(broken)
    with pytest.raises(UserError, match="does not exist"):
        Pipeline(tmp_path / "nothing")


def test_wrong_pipeline_arguments_are_named(sd1_engine, tmp_path):
    from sdrt.runtime import Pipeline

    a_file = tmp_path / "engine.txt"
    a_file.write_text("")
    for kwargs, needle in [
        (dict(engine_dir=a_file), "is a file"),
        (dict(engine_dir=None), "engine directory None: must be a path"),
        (dict(engine_dir=sd1_engine, verify="full"), "verify 'full': choose one of none, size, sha256"),
        (dict(engine_dir=sd1_engine, backend=3), "unknown backend 3"),
        (dict(engine_dir=sd1_engine, backend_options=4), "backend_options 4"),
        (dict(engine_dir=sd1_engine, backend_options={"thread": 2}),
         "backend option 'thread': backend 'cpu' takes threads"),
    ]:
        with pytest.raises(UserError, match=needle):
            Pipeline(**kwargs)
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():  # named as --backend names it
        with pytest.raises(UserError, match="backend 'ort-cuda' needs CUDAExecutionProvider"):
            Pipeline(sd1_engine, backend="ort-cuda")

