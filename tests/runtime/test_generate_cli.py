"""`sdrt generate` end to end through the CLI: files, PNG parameters, preview, errors as one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.images import read_png_parameters
from tests.conftest import ROOT, assert_one_line_error, run_cli, umask


def test_generate_writes_numbered_pngs_with_parameters_and_a_preview(sd1_engine, tmp_path):
    out = tmp_path / "x.png"
    gif = tmp_path / "p.gif"
    with umask(0o022):
        r = run_cli("generate", sd1_engine, "a red circle", "-o", out, "--num-images", 2, "--steps", 4,
                    "--seed", 42, "--scheduler", "euler_a", "--negative-prompt", "blurry", "--preview", gif)
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["p.gif", "x-0.png", "x-1.png"]
    # the umask's mode, as any other program's output: a web server or another user can read them
    assert {name: (tmp_path / name).stat().st_mode & 0o777 for name in files} == dict.fromkeys(files, 0o644)
    params = read_png_parameters(tmp_path / "x-0.png")
    assert params.startswith("a red circle\nNegative prompt: blurry\n")
    assert "Steps: 4" in params and "Seed: 42" in params and "Euler a" in params and "Size: 32x32" in params
    with Image.open(gif) as g:
        assert g.n_frames >= 3 and g.size == (32, 32)
    a, b = (np.asarray(Image.open(tmp_path / f"x-{i}.png")) for i in range(2))
    assert a.shape == (32, 32, 3) and not np.array_equal(a, b)
    assert "denoise" in r.stderr and "4 steps: " in r.stderr and "ms per UNet evaluation" in r.stderr


def test_same_seed_same_image_and_model_scheduler_by_default(sd2_engine, tmp_path):
    for name in ("a.png", "b.png"):
        r = run_cli("generate", sd2_engine, "a blue square", "-o", tmp_path / name, "--steps", 3, "--seed", 5, "-q")
        assert r.returncode == 0, r.stderr
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png"))
    np.testing.assert_array_equal(a, b)
    assert "Sampler: DDIM" in read_png_parameters(tmp_path / "a.png")


def test_img2img_from_the_command_line(sd1_engine, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(init)
    r = run_cli("generate", sd1_engine, "a cat", "--init-image", init, "--strength", 0.5, "--steps", 4,
                "-o", tmp_path / "o.png", "-q")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "o.png").size == (48, 40)
    assert "Denoising strength: 0.5" in read_png_parameters(tmp_path / "o.png")
    assert "warning" not in r.stderr
    # the default strength, as --help says
    r = run_cli("generate", sd1_engine, "a cat", "--init-image", init, "--steps", 4, "-o", tmp_path / "d.png", "-q")
    from sdrt.runtime.pipeline import DEFAULT_STRENGTH

    assert f"Denoising strength: {DEFAULT_STRENGTH}" in read_png_parameters(tmp_path / "d.png")
    assert f"(default {DEFAULT_STRENGTH})" in " ".join(run_cli("generate", "--help").stdout.split())


def test_an_init_image_off_the_size_grid_is_resized_with_a_one_line_warning(sd1_engine, tmp_path):
    init = tmp_path / "odd.png"
    Image.fromarray(np.zeros((41, 49, 3), np.uint8)).save(init)
    r = run_cli("generate", sd1_engine, "a cat", "--init-image", init, "--steps", 2, "-o", tmp_path / "o.png", "-q")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "o.png").size == (48, 40)
    warning = [line for line in r.stderr.splitlines() if "warning" in line]
    assert warning == [f"sdrt generate: warning: init image {init}: 49x41 is not a multiple of the VAE scale "
                       "factor 2; resized to 48x40, as diffusers does"]


@pytest.mark.parametrize("args, needles", [
    (["--height", "33"], ["height 33", "multiple of 2"]),
    (["--steps", "0"], ["steps 0"]),
    (["--guidance", "-2"], ["guidance -2"]),
    (["--num-images", "0"], ["num_images 0"]),
    (["--strength", "0.5"], ["--strength 0.5", "--init-image"]),
    (["--scheduler", "magic"], ["'magic'", "dpmpp_2m_karras"]),
    (["--backend", "gpu9000"], ["gpu9000"]),
    (["--init-image", "/nonexistent.png"], ["/nonexistent.png"]),
    (["--init-image", "/nonexistent.png", "--strength", "0"], ["/nonexistent.png"]),
    (["-o", "out.jpg"], ["out.jpg", ".png"]),
])
def test_bad_input_is_one_line(sd1_engine, tmp_path, args, needles):
    assert_one_line_error(run_cli("generate", sd1_engine, "x", "--steps", "2", *args, "-q",
                            *([] if "-o" in args else ["-o", str(tmp_path / "o.png")])), *needles)


def test_bad_strength_and_unreadable_image(sd1_engine, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(init)
    assert_one_line_error(run_cli("generate", sd1_engine, "x", "--init-image", init, "--strength", "1.5", "-q",
                            "-o", tmp_path / "o.png"), "strength 1.5")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert_one_line_error(run_cli("generate", sd1_engine, "x", "--init-image", bad, "-q", "-o", tmp_path / "o.png"),
                    "bad.png")


def test_missing_or_corrupt_engine_directory(sd1_engine, tmp_path):
    import shutil

    assert_one_line_error(run_cli("generate", tmp_path / "none", "x", "-q"), "does not exist")
    (tmp_path / "a-file").write_text("")
    assert_one_line_error(run_cli("generate", tmp_path / "a-file", "x", "-q"), "a-file", "is a file")
    broken = tmp_path / "e"
    shutil.copytree(sd1_engine, broken)
    (broken / "vae_decoder" / "model.onnx").write_bytes(b"\0" * 10)
    assert_one_line_error(run_cli("generate", broken, "x", "-q", "-o", tmp_path / "o.png"), "vae_decoder")


def test_runtime_imports_no_torch():
    code = ("import sys; import sdrt.runtime; from sdrt.runtime import Pipeline; import sdrt.runtime.cli; "
            "import sdrt.runtime.backends.onnxruntime, sdrt.runtime.backends.tensorrt; "
            "import sdrt.runtime.prompts, sdrt.runtime.embeddings, sdrt.runtime.onnx_weights; "
            "from sdrt.cli import build_parser; build_parser(); "
            "print(sorted({'torch', 'transformers', 'diffusers', 'tensorrt'} & set(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_openvino_backend_matches_the_default(sd1_engine):
    pytest.importorskip("openvino")
    from sdrt.runtime import Pipeline
    from sdrt.runtime.images import images_psnr

    kw = dict(steps=3, seed=9, scheduler="dpmpp_2m", num_images=2)
    ov = Pipeline(sd1_engine, backend="openvino").generate("a yellow triangle", **kw)
    ort = Pipeline(sd1_engine).generate("a yellow triangle", **kw)
    for a, b in zip(ov.images, ort.images):
        assert images_psnr(a, b) >= 40


def test_unwritable_output_is_refused_before_any_work(sd1_engine, tmp_path):
    assert_one_line_error(run_cli("generate", sd1_engine, "x", "-o", tmp_path / "no" / "such" / "o.png", "-q"),
                          "cannot write into")


def test_init_image_array_of_the_wrong_layout_is_named(sd1_engine):
    from sdrt.errors import UserError
    from sdrt.runtime import Pipeline

    pipe = Pipeline(sd1_engine)
    with pytest.raises(UserError, match=r"init_image <uint8 array of shape \[32, 32, 3\]>: .*float \[1, 3, H, W\]"):
        pipe.request("x", init_image=np.zeros((32, 32, 3), np.uint8))


def test_img2img_size_options_resize_the_init_image(sd2_engine, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(init)
    r = run_cli("generate", sd2_engine, "a cat", "--init-image", init, "--height", 24, "--width", 32, "--steps", 4,
                "-o", tmp_path / "o.png", "-q")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "o.png").size == (32, 24)
    assert_one_line_error(run_cli("generate", sd2_engine, "a cat", "--init-image", init, "--height", 26, "-q",
                                  "-o", tmp_path / "p.png"), "height 26", "multiple of 4")


@pytest.mark.parametrize("scheduler, evaluations", [("pndm", 4), ("heun", 5), ("euler", None)])
def test_steps_and_unet_evaluations_are_both_said_where_they_differ(sd1_engine, tmp_path, scheduler, evaluations):
    r = run_cli("generate", sd1_engine, "x", "--steps", 3, "--scheduler", scheduler, "-o", tmp_path / "o.png", "-q")
    assert r.returncode == 0, r.stderr
    said = f"; 3 steps ({evaluations} UNet evaluations): " if evaluations else "; 3 steps: "
    assert said in r.stderr and "ms per UNet evaluation" in r.stderr, r.stderr
    assert "Steps: 3," in read_png_parameters(tmp_path / "o.png")
