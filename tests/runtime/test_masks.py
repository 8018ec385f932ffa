"""sdrt.runtime.masks against diffusers' own image and mask processors, and the properties of
AUTOMATIC1111's options."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdrt.errors import UserError
from sdrt.runtime import masks

torch = pytest.importorskip("torch")
from diffusers.image_processor import VaeImageProcessor  # noqa: E402


def _scene(w: int, h: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    picture = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    draw.ellipse([w // 5, h // 4, w // 2, 3 * h // 4], fill=255)
    draw.rectangle([3 * w // 5, h // 6, 4 * w // 5, h // 3], fill=190)   # grey: binarised at 0.5
    return picture, mask


PROCESSOR = VaeImageProcessor(vae_scale_factor=8)
MASK_PROCESSOR = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                                   do_convert_grayscale=True)


@pytest.mark.parametrize("size, out", [((64, 48), (64, 48)), ((77, 50), (48, 32)), ((40, 90), (56, 96))])
def test_picture_and_mask_equal_diffusers_processors(size, out):
    picture, mask = _scene(*size)
    got = masks.prepare(picture, mask, height=out[1], width=out[0], multiple=8, default_size=(64, 64))
    want_image = PROCESSOR.preprocess(picture, height=out[1], width=out[0]).numpy()
    want_mask = MASK_PROCESSOR.preprocess(mask, height=out[1], width=out[0]).numpy()
    np.testing.assert_allclose(got.image, want_image, atol=1e-6)
    np.testing.assert_array_equal(got.mask, want_mask)
    assert set(np.unique(got.mask)) == {0.0, 1.0}


def test_crop_and_fill_equal_diffusers_padding_mask_crop():
    picture, mask = _scene(120, 80, seed=1)
    for pad, (w, h) in ((0, (64, 64)), (6, (48, 32)), (20, (32, 64))):
        box = masks.crop_region(mask, w, h, pad)
        assert box == tuple(VaeImageProcessor.get_crop_region(mask, w, h, pad=pad))
        got = masks.prepare(picture, mask, height=h, width=w, multiple=8, default_size=(64, 64),
                            inpaint_area="masked", inpaint_padding=pad)
        want = MASK_PROCESSOR.preprocess(mask, height=h, width=w, resize_mode="fill", crops_coords=box).numpy()
        np.testing.assert_array_equal(got.mask, want)
        want_image = PROCESSOR.preprocess(picture, height=h, width=w, resize_mode="fill", crops_coords=box).numpy()
        np.testing.assert_allclose(got.image, want_image, atol=1e-6)


def test_the_finish_equals_diffusers_apply_overlay_and_keeps_the_outside():
    picture, mask = _scene(120, 80, seed=2)
    box = masks.crop_region(mask, 64, 48, 4)
    painted = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    ours = masks.Finish(picture, mask, box)(painted)
    want = np.asarray(PROCESSOR.apply_overlay(mask, picture, Image.fromarray(painted), box))
    np.testing.assert_array_equal(ours, want)
    outside = np.asarray(mask) == 0
    np.testing.assert_array_equal(ours[outside], np.asarray(picture)[outside])


@pytest.mark.parametrize("shape, size", [((1, 1, 64, 48), (8, 6)), ((2, 1, 36, 44), (9, 11)), ((1, 1, 30, 50), (7, 9))])
def test_the_latent_mask_is_torch_nearest_interpolation(shape, size):
    mask = (np.random.default_rng(0).random(shape) > 0.5).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(mask), size=size).numpy()
    np.testing.assert_array_equal(masks.latent_mask(mask, size), want)


def test_outpaint_extends_the_canvas_and_masks_only_the_border():
    picture, _ = _scene(40, 24)
    canvas, border = masks.outpaint(picture, None, (3, 5, 2, 7))
    assert canvas.size == (48, 33) and border.size == (48, 33)
    pixels, m = np.asarray(canvas), np.asarray(border)
    np.testing.assert_array_equal(pixels[2:26, 3:43], np.asarray(picture))
    assert (m[2:26, 3:43] == 0).all() and m.sum() == 255 * (48 * 33 - 40 * 24)
    np.testing.assert_array_equal(pixels[0, 3:43], np.asarray(picture)[0])   # the edge carried outwards
    with pytest.raises(UserError, match="LEFT,RIGHT,TOP,BOTTOM"):
        masks.parse_outpaint("0,0,0,0")


def test_blur_spreads_symmetrically_and_keeps_the_mass():
    mask = Image.new("L", (41, 31), 0)
    mask.putpixel((20, 15), 255)
    wide = np.asarray(masks.blur_mask(mask, 3, 0)).astype(int)
    assert wide[15].tolist() == wide[15][::-1].tolist() and (wide[:15] == 0).all()   # along rows only
    both = np.asarray(masks.blur_mask(Image.new("L", (30, 30), 200), 4, 4))
    assert (both == 200).all()   # a flat mask stays flat (mirrored borders)


def test_fill_paints_only_under_the_mask():
    picture, mask = _scene(64, 48, seed=4)
    filled = np.asarray(masks.fill_masked(picture, mask))
    keep = np.asarray(mask) == 0
    assert np.abs(filled[keep].astype(int) - np.asarray(picture)[keep].astype(int)).max() <= 1
    inside = np.asarray(mask) == 255
    assert filled[inside].std() < np.asarray(picture)[inside].std() / 2   # smooth colours, not the picture


def test_masks_from_arrays_and_bytes_and_unreadable_ones(tmp_path):
    picture, mask = _scene(32, 32)
    array = np.asarray(mask).astype(np.float32) / 255
    a = masks.prepare(picture, array, height=32, width=32, multiple=8, default_size=(32, 32))
    mask.save(tmp_path / "m.png")
    b = masks.prepare(picture, (tmp_path / "m.png").read_bytes(), height=32, width=32, multiple=8,
                      default_size=(32, 32))
    np.testing.assert_array_equal(a.mask, b.mask)
    with pytest.raises(UserError, match="mask: cannot be read as an image"):
        masks.prepare(picture, b"junk", height=32, width=32, multiple=8, default_size=(32, 32))
    inverted = masks.prepare(picture, mask, height=32, width=32, multiple=8, default_size=(32, 32), mask_invert=True)
    np.testing.assert_array_equal(inverted.mask, 1 - a.mask)
