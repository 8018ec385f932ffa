"""Inpainting through the service: the native request's mask, and AUTOMATIC1111's img2img with a mask sent by
its own client, answered as AUTOMATIC1111 answers (the original pasted back outside the blurred mask)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from sdrt.runtime.images import images_psnr

httpx = pytest.importorskip("httpx")

H, W = 24, 40


@pytest.fixture(scope="module")
def scene():
    yy, xx = np.mgrid[0:H, 0:W]
    picture = Image.fromarray(np.stack([(xx * 6) % 256, (yy * 9) % 256, ((xx + 2 * yy) * 4) % 256],
                                       axis=-1).astype(np.uint8))
    mask = Image.new("L", (W, H), 0)
    ImageDraw.Draw(mask).rectangle([10, 6, 25, 17], fill=255)
    return picture, mask


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_native_mask_equals_the_pipeline(live, serve_pipe, scene):
    picture, mask = scene
    body = dict(prompt="a red fox", init_image=_b64(picture), mask=_b64(mask), steps=3, seed=4, overlay=True,
                masked_content="latent-nothing", strength=0.7)
    r = httpx.post(f"{live.url}/v1/images", json=body, timeout=120)
    assert r.status_code == 200, r.text
    served = _decode(r.json()["images"][0])
    want = serve_pipe.generate("a red fox", init_image=picture, mask=mask, steps=3, seed=4, overlay=True,
                               masked_content="latent-nothing", strength=0.7).images[0]
    assert images_psnr(served, want) >= 60
    keep = np.asarray(mask) == 0
    np.testing.assert_array_equal(served[keep], np.asarray(picture)[keep])
    assert "Masked content: latent-nothing" in r.json()["parameters"][0]
    bad = httpx.post(f"{live.url}/v1/images", json=dict(body, mask="!!!"), timeout=30)
    assert bad.status_code in (400, 422) and "mask" in bad.text
    black = httpx.post(f"{live.url}/v1/images", json=dict(body, mask=_b64(Image.new("L", (W, H)))), timeout=30)
    assert black.status_code == 400 and "all black" in black.json()["error"]["message"]


def test_a1111_img2img_with_a_mask_from_its_client(live, scene):
    webuiapi = pytest.importorskip("webuiapi")
    picture, mask = scene
    api = webuiapi.WebUIApi(host="127.0.0.1", port=live.port, sampler="Euler a", steps=3)
    result = api.img2img(images=[picture], mask_image=mask, prompt="a blue bird", seed=7, denoising_strength=0.8,
                         inpainting_fill=1, inpaint_full_res=False, width=W, height=H)
    out = np.asarray(result.image.convert("RGB"))
    assert out.shape == (H, W, 3)
    # mask_blur 4 by default: beyond the blur's reach (2 * int(2.5 * 4 + 0.5) / 2 = 10 px) the original stands
    far = np.asarray(mask.filter(ImageFilter.MaxFilter(23))) == 0
    assert far.any()
    np.testing.assert_array_equal(out[far], np.asarray(picture)[far])
    inside = np.asarray(mask) == 255
    assert not np.array_equal(out[inside], np.asarray(picture)[inside])
    crop = api.img2img(images=[picture], mask_image=mask, prompt="a blue bird", seed=7, inpaint_full_res=True,
                       inpaint_full_res_padding=4, width=32, height=32)
    assert crop.image.size == (W, H)   # "only masked": processed at 32x32 around the mask, pasted back
