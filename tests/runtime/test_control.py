"""sdrt.runtime.control without torch: the control image equal to diffusers' prepare_image, the keep flags equal to
those StableDiffusionControlNetPipeline computes, guess mode's scales equal to torch's, Canny on synthetic shapes,
and the one-line checks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdrt.errors import UserError
from sdrt.runtime import control
from tests.conftest import ROOT


def test_imports_no_torch():
    code = "import sys, sdrt.runtime.control; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def _picture(h: int, w: int, mode: str = "RGB") -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    rgba = np.stack([(xx * 5) % 256, (yy * 7) % 256, ((xx + yy) * 3) % 256, (xx * yy) % 256], -1).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA").convert(mode)


@pytest.mark.parametrize("mode, size, out", [("RGB", (37, 45), (40, 48)), ("RGBA", (20, 30), (64, 48)),
                                             ("L", (33, 17), (40, 24)), ("RGB", (16, 16), (16, 16))])
def test_control_image_equals_diffusers(mode, size, out, tmp_path):
    pytest.importorskip("diffusers")
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils import load_image

    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    image = _picture(*size, mode)
    want = processor.preprocess(image, height=out[0], width=out[1]).numpy()
    got = control.control_image(image, out[0], out[1])    # a PIL image: resized in its own mode, then RGB
    assert got.dtype == np.float32 and got.shape == (1, 3, *out)
    np.testing.assert_array_equal(got, want)
    path = tmp_path / "control.png"
    image.save(path)
    want = processor.preprocess(load_image(str(path)), height=out[0], width=out[1]).numpy()
    np.testing.assert_array_equal(control.control_image(path, out[0], out[1]), want)
    np.testing.assert_array_equal(control.control_image(path.read_bytes(), out[0], out[1]), want)


def test_an_unreadable_control_image_is_one_line(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture")
    with pytest.raises(UserError, match="controls 'edges' image .*bad.png.*cannot be read") as e:
        control.control_image(bad, 64, 64, "edges")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="control image .*missing.png.*no such file"):
        control.preprocess(tmp_path / "missing.png", "canny")
    with pytest.raises(UserError, match="module 'sobel': sdrt's preprocessors are none, canny"):
        control.preprocess(_picture(8, 8), "sobel")


@pytest.fixture(scope="module")
def controlnet_pipeline(sd1_model, tmp_path_factory):
    """diffusers' StableDiffusionControlNetPipeline over the tiny SD1 with a tiny ControlNet, recording the
    conditioning scale of every ControlNet call."""
    torch = pytest.importorskip("torch")
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from tools.make_models import make_controlnet

    cn = ControlNetModel.from_pretrained(make_controlnet(sd1_model, tmp_path_factory.mktemp("cn") / "cn"))
    pipe = StableDiffusionControlNetPipeline.from_pretrained(sd1_model, controlnet=cn, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    forward = cn.forward

    def recording(*args, **kwargs):
        calls.append(kwargs["conditioning_scale"])
        return forward(*args, **kwargs)

    cn.forward = recording
    return pipe, calls, torch


@pytest.mark.parametrize("start, end, steps", [(0.0, 1.0, 5), (0.2, 0.8, 5), (0.0, 0.5, 7), (0.5, 1.0, 4),
                                               (0.33, 0.67, 10), (0.1, 0.3, 3)])
def test_keep_flags_equal_the_pipelines(controlnet_pipeline, start, end, steps):
    """Per ControlNet call of the real pipeline (PNDM: one more timestep than steps), the scale it passed is
    conditioning scale x keep flag."""
    pipe, calls, torch = controlnet_pipeline
    calls.clear()
    pipe("a cat", image=Image.new("RGB", (16, 16), (200, 30, 30)), height=16, width=16, num_inference_steps=steps,
         controlnet_conditioning_scale=0.5, control_guidance_start=start, control_guidance_end=end,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    keep = control.controlnet_keep(len(pipe.scheduler.timesteps), start, end)
    assert calls == [0.5 * k for k in keep]
    assert 0.0 in keep or (start, end) == (0.0, 1.0)


def test_guess_mode_scales_equal_torch():
    torch = pytest.importorskip("torch")
    for n in range(1, 20):
        for scale in (1.0, 0.5, 0.7, 1.3):
            want = (torch.logspace(-1, 0, n) * scale).numpy()
            np.testing.assert_array_equal(control.residual_scales(n, scale, guess_mode=True), want)
            np.testing.assert_array_equal(control.residual_scales(n, scale), np.full(n, scale, np.float32))
    # pooled ControlNets (shuffle) scale every residual alike, guess mode or not, as ControlNetModel.forward does
    np.testing.assert_array_equal(control.residual_scales(13, 0.5, guess_mode=True, global_pool=True), [0.5] * 13)
    out = control.scaled({"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)}, ["a", "b"], [1.0, 0.25])
    assert out["b"].dtype == np.float32 and out["b"].tolist() == [0.25, 0.25]


def _edges(img, *thresholds):
    out = control.canny(img, *thresholds)
    assert out.dtype == np.uint8 and out.shape == (*img.shape[:2], 3) and set(np.unique(out)) <= {0, 255}
    assert (out[..., 0] == out[..., 2]).all()
    return out[..., 0] > 0


def _thin(edges):
    """No 2x2 block of edge pixels: non-maximum suppression leaves one-pixel lines."""
    return not (edges[:-1, :-1] & edges[1:, :-1] & edges[:-1, 1:] & edges[1:, 1:]).any()


def test_canny_outlines_a_square_and_a_disc():
    img = np.zeros((48, 56, 3), np.uint8)
    img[10:30, 15:35] = 255
    e = _edges(img)
    ys, xs = np.nonzero(e)
    # OpenCV marks the first pixel of a step's equal-magnitude pair: just outside at the top and left, just
    # inside at the bottom and right
    assert ys.min() == 9 and ys.max() == 29 and xs.min() == 14 and xs.max() == 34
    assert e[9, 16:34].all() and e[29, 15:35].all() and e[11:29, 14].all() and e[10:29, 34].all()
    assert _thin(e) and e.sum() == 76
    yy, xx = np.mgrid[0:64, 0:64]
    r = np.hypot(yy - 31.5, xx - 31.5)
    e = _edges(np.where(r < 20, 220, 20).astype(np.uint8))  # one channel
    assert _thin(e) and np.abs(r[e] - 20).max() <= 1.5 and e.sum() >= 2 * np.pi * 20 * 0.7


def test_canny_thresholds_and_hysteresis():
    flat = np.full((20, 20, 3), 128, np.uint8)
    assert not _edges(flat).any()
    img = np.zeros((30, 40), np.uint8)
    img[:, 20:] = 25  # magnitude 4 x 25 = 100: not above the low threshold
    assert not _edges(img).any()
    img[:, 20:] = 40  # 160: between low and high, and nothing strong to join
    assert not _edges(img).any()
    img[:15, 20:] = 60  # 240 above: strong in the top half, the weak bottom half joins it
    e = _edges(img)
    assert e.sum() == 30 and (e[:, 19] | e[:, 20]).all()  # one line, bending where the contrast changes
    assert _edges(img, 100, 300).sum() == 0 and _edges(img, 300, 100).sum() == 0  # the two are sorted
    with pytest.raises(UserError, match="uint8"):
        control.canny(img.astype(np.float32))


def test_canny_takes_the_strongest_channel():
    """As cv2.Canny on a colour image: an edge only in blue is found (grey would make it 29 levels deep)."""
    img = np.zeros((20, 20, 3), np.uint8)
    img[:, 10:, 2] = 255
    assert _edges(img)[:, 9].all()
    grey = (0.114 * img[..., 2]).round().astype(np.uint8)
    assert not _edges(grey).any()


def test_checks_are_one_line():
    records = {"canny": {"kind": "controlnet"}, "style": {"kind": "t2i_adapter", "image_multiple": 8}}
    picture = _picture(8, 8)
    for specs, needle in ((["pose:x.png"], "controls 'pose': this engine has no such ControlNet; it has canny, style"),
                          ([("canny", picture, -0.1)], "controls 'canny' scale -0.1: must be a number in [0, 2]"),
                          ([("canny", picture, 1, 0.5, 0.5)], "start 0.5 must be below end 0.5"),
                          ([("canny", picture, 1, 0.2, 1.1)], "controls 'canny' end 1.1"),
                          ([("style", picture)], "controls 'style': 36x20 is not a multiple of 8"),
                          ([("canny", picture), ("style", picture)], "ControlNets or T2I-Adapters, not both")):
        with pytest.raises(UserError) as e:
            control.check_controls(specs, records, 20 if "36x20" in needle else 24, 36 if "36x20" in needle else 40)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(UserError, match="it has none .*--add --controlnet"):
        control.check_controls(["pose:x.png"], {}, 16, 16)
    with pytest.raises(UserError, match="guess_mode: only ControlNets use it"):
        control.check_controls([("style", picture)], records, 16, 16, guess_mode=True)
    with pytest.raises(UserError, match="name 'a b'"):
        control.check_name("a b")


def test_check_fits_names_the_difference():
    out = [{"name": "mid_residual", "dtype": "float32", "shape": ["batch", 64, "latent_height_1", "latent_width_1"]}]
    unet = {"base": {"cross_attention_dim": 768, "in_channels": 4}, "inputs": out}
    control.check_fits("canny", {"base": {"cross_attention_dim": 768, "in_channels": 4}, "outputs": out}, unet)
    with pytest.raises(UserError, match="made for a model with cross_attention_dim=1024; this engine's UNet has "
                                        "cross_attention_dim=768"):
        control.check_fits("canny", {"base": {"cross_attention_dim": 1024, "in_channels": 4}, "outputs": out}, unet)
    wrong = [dict(out[0], shape=["batch", 32, "latent_height_1", "latent_width_1"])]
    with pytest.raises(UserError, match="output mid_residual has shape"):
        control.check_fits("canny", {"base": unet["base"], "outputs": wrong}, unet)
