"""Runtime image IO: pixel equality with diffusers' VaeImageProcessor, PNG parameters, GIF, grid, PSNR."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdrt.errors import SdrtWarning, UserError
from sdrt.runtime.images import (
    contact_sheet,
    decode_to_uint8,
    format_parameters,
    images_psnr,
    load_init_image,
    read_png_parameters,
    save_gif,
    save_png,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def diffusers_image():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils import load_image

    return torch, VaeImageProcessor, load_image


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decode_equals_diffusers_postprocess(diffusers_image, dtype):
    torch, VaeImageProcessor, _ = diffusers_image
    rng = np.random.default_rng(0)
    sample = (rng.standard_normal((2, 3, 24, 40)) * 0.8).astype(dtype)  # ~20% outside [-1, 1] exercises clamp
    # values that sit exactly on rounding boundaries: (x/2 + 0.5) * 255 == k + 0.5
    sample[0, 0, 0, :8] = ((np.arange(8) + 0.5) / 255 - 0.5) * 2
    processor = VaeImageProcessor(vae_scale_factor=8)
    pils = processor.postprocess(torch.from_numpy(sample), output_type="pil", do_denormalize=[True, True])
    want = np.stack([np.asarray(p) for p in pils])
    got = decode_to_uint8(sample)
    assert got.dtype == np.uint8 and got.shape == (2, 24, 40, 3)
    np.testing.assert_array_equal(got, want)


def test_decode_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\[n, C, H, W\]"):
        decode_to_uint8(np.zeros((3, 8, 8), np.float32))


def _odd_image(path: Path, mode: str = "RGB", size=(61, 45), exif_orientation: int | None = None) -> Path:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize(
    "name, mode, orientation, height, width",
    [
        ("odd.png", "RGB", None, None, None),          # 61x45 -> 56x40 with factor 8: a real Lanczos resize
        ("odd_rgba.png", "RGBA", None, None, None),
        ("odd_l.png", "L", None, None, None),
        ("rotated.jpg", "RGB", 6, None, None),         # phone photo: EXIF orientation applied first
        ("explicit.png", "RGB", None, 67, 33),         # explicit size, also rounded down
    ],
)
def test_load_init_image_equals_diffusers_preprocess(diffusers_image, tmp_path, name, mode, orientation, height, width):
    _, VaeImageProcessor, load_image = diffusers_image
    path = _odd_image(tmp_path / name, mode, exif_orientation=orientation)
    want = VaeImageProcessor(vae_scale_factor=8).preprocess(load_image(str(path)), height=height, width=width).numpy()
    with pytest.warns(SdrtWarning, match="not a multiple of the VAE scale factor 8; resized to"):
        got = load_init_image(path, 8, height=height, width=width)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert got.shape[2] % 8 == 0 and got.shape[3] % 8 == 0
    np.testing.assert_array_equal(got, want)


def test_load_init_image_exact_multiple_not_resampled(tmp_path):
    import warnings

    path = _odd_image(tmp_path / "exact.png", size=(32, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say about a size on the grid
        got = load_init_image(path, 4)
    pixels = np.asarray(Image.open(path)).astype(np.float32) / 255.0
    np.testing.assert_array_equal(got[0], (2.0 * pixels - 1.0).transpose(2, 0, 1))
    assert got.min() >= -1 and got.max() <= 1


def test_a_pil_init_image_is_prepared_as_its_file_is(tmp_path):
    path = _odd_image(tmp_path / "rotated.jpg", "RGB", exif_orientation=6)
    with Image.open(path) as opened, pytest.warns(SdrtWarning, match="PIL image"):
        from_pil = load_init_image(opened, 8)
    with pytest.warns(SdrtWarning, match="rotated.jpg"):
        np.testing.assert_array_equal(from_pil, load_init_image(path, 8))


def test_load_init_image_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(UserError, match="nope.png"):
        load_init_image(missing, 8)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(UserError, match="garbage.png"):
        load_init_image(garbage, 8)
    with pytest.raises(UserError, match=str(tmp_path)):
        load_init_image(tmp_path, 8)
    tiny = _odd_image(tmp_path / "tiny.png", size=(5, 5))
    with pytest.raises(UserError, match="tiny.png"):
        load_init_image(tiny, 8)


def test_format_parameters_a1111_layout():
    text = format_parameters("a cat, cute", "blurry", 20, "euler_a", 7.5, 1, 512, 768, "sd15")
    lines = text.split("\n")
    assert lines[0] == "a cat, cute"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 768x512, Model: sd15")
    assert "Version: sdrt " in lines[2]


def test_format_parameters_options():
    text = format_parameters("p", "", 30, "dpmpp_2m_karras", 7.0, 42, 64, 64, "m", strength=0.75,
                             extra={"Note": "a, b"}, version="")
    assert text == (
        "p\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 64x64, "
        'Model: m, Denoising strength: 0.75, Note: "a, b"'
    )
    unknown = format_parameters("p", None, 1, "my_sched", 1, 0, 8, 8, "m:v1", version="")
    assert unknown.endswith('Sampler: my_sched, CFG scale: 1, Seed: 0, Size: 8x8, Model: "m:v1"')


@pytest.mark.parametrize("prompt", ["a red fox, 4k", "東京の夜 🌃, café"])
def test_png_parameters_round_trip(tmp_path, prompt):
    image = np.random.default_rng(2).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    parameters = format_parameters(prompt, "ugly", 20, "ddim", 7.5, 3, 24, 40, "tiny")
    path = save_png(image, tmp_path / "out" / "x.png", parameters)
    assert read_png_parameters(path) == parameters
    with Image.open(path) as png:
        assert png.format == "PNG"
        np.testing.assert_array_equal(np.asarray(png), image)
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.png"]  # no temporary left behind


def test_png_chunk_is_text_for_latin1(tmp_path):
    path = save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "x.png", "plain, text")
    data = path.read_bytes()
    assert b"tEXtparameters\x00plain, text" in data


def test_save_png_overwrites_atomically_and_cleans_up_on_failure(tmp_path):
    path = tmp_path / "x.png"
    save_png(np.zeros((4, 4, 3), np.uint8), path, "one")
    save_png(np.full((4, 4, 3), 9, np.uint8), path, "two")
    assert read_png_parameters(path) == "two"
    with pytest.raises(ValueError):
        save_png(np.zeros((4, 4), np.float32), path, "bad")
    assert read_png_parameters(path) == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_pictures_get_the_umask_mode_and_a_replaced_file_keeps_its_own(tmp_path, mask):
    """mkstemp would make every picture 0600, unreadable by a web server or another user."""
    from tests.conftest import umask

    image = np.zeros((4, 4, 3), np.uint8)
    with umask(mask):
        png = save_png(image, tmp_path / "x.png", "p")
        gif = save_gif([image, image], tmp_path / "x.gif")
        assert png.stat().st_mode & 0o777 == 0o666 & ~mask
        assert gif.stat().st_mode & 0o777 == 0o666 & ~mask
        png.chmod(0o640)
        save_png(image, png, "again")
        assert png.stat().st_mode & 0o777 == 0o640


def test_save_gif(tmp_path):
    frames = [np.full((16, 24, 3), v, np.uint8) for v in (0, 128, 255)]
    path = save_gif(frames, tmp_path / "preview.gif", duration_ms=50)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.size == (24, 16) and gif.n_frames == 3
        assert gif.info.get("duration") == 50 and gif.info.get("loop") == 0
    with pytest.raises(ValueError):
        save_gif([], tmp_path / "empty.gif")
    with pytest.raises(ValueError, match="size"):
        save_gif([frames[0], np.zeros((8, 8, 3), np.uint8)], tmp_path / "mixed.gif")


def test_contact_sheet():
    images = [np.full((16, 16, 3), 10 * i, np.uint8) for i in range(5)]
    sheet = contact_sheet(images)
    assert sheet.dtype == np.uint8 and sheet.ndim == 3 and sheet.shape[2] == 3
    gap = 4
    assert sheet.shape[:2] == (2 * (16 + gap) + gap, 3 * (16 + gap) + gap)  # 5 images -> 3 columns, 2 rows
    np.testing.assert_array_equal(sheet[gap : gap + 16, gap + 20 : gap + 36], images[1])
    labelled = contact_sheet(images, labels=[f"seed {i}" for i in range(5)], columns=5)
    # cells widen to fit their captions, so captions never run into the next picture
    assert labelled.shape[1] > 5 * (16 + gap) + gap and labelled.shape[0] > 16 + 2 * gap
    assert (labelled[gap + 16 :] < 128).any()  # some caption ink below the images
    big = contact_sheet(images[:2], columns=2, scale=3)
    assert big.shape[:2] == (48 + 2 * gap, 2 * (48 + gap) + gap)
    np.testing.assert_array_equal(big[gap : gap + 48, gap : gap + 48], np.kron(images[0], np.ones((3, 3, 1), np.uint8)))
    mixed = contact_sheet([np.zeros((8, 12, 3), np.uint8), np.zeros((20, 6, 3), np.uint8)])
    assert mixed.shape[:2] == (20 + 2 * gap, 2 * (12 + gap) + gap)
    with pytest.raises(ValueError):
        contact_sheet(images, labels=["one"])


def test_images_psnr():
    a = np.zeros((2, 8, 8, 3), np.uint8)
    assert images_psnr(a, a) == math.inf
    b = a.copy()
    b[...] = 1
    assert images_psnr(a, b) == pytest.approx(20 * math.log10(255))
    assert images_psnr(np.full_like(a, 255), a) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        images_psnr(a, a[0])


def test_runtime_images_import_leaves_out_torch():
    code = "import sys, sdrt.runtime.images\nassert 'torch' not in sys.modules and 'diffusers' not in sys.modules\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
