"""ControlNets through the service: the native request's controls, and AUTOMATIC1111's ControlNet extension API
(alwayson_scripts, /controlnet/model_list, /controlnet/module_list) as its client sends it."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.images import images_psnr
from tests.serve.conftest import LiveServer, make_service

httpx = pytest.importorskip("httpx")
H, W = 24, 40


@pytest.fixture(scope="module")
def server(controlled):
    from sdrt.runtime import Pipeline
    from sdrt.serve.app import create_app

    pipe = Pipeline(controlled["engine"])
    service = make_service(pipe)
    with LiveServer(create_app(service)) as live:
        live.pipe = pipe
        yield live
    service.engine.close()


def _b64(path) -> str:
    return base64.b64encode(open(path, "rb").read()).decode()


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_native_controls_equal_the_pipeline(server, controlled):
    body = dict(prompt="a fox", steps=3, seed=5, height=H, width=W, guess_mode=True,
                controls=[{"name": "edges", "image": _b64(controlled["pictures"][0]), "scale": 0.9, "end": 0.8}])
    r = httpx.post(f"{server.url}/v1/images", json=body, timeout=120)
    assert r.status_code == 200, r.text
    want = server.pipe.generate("a fox", steps=3, seed=5, height=H, width=W, guess_mode=True,
                                controls=[("edges", controlled["pictures"][0], 0.9, 0.0, 0.8)]).images[0]
    assert images_psnr(_decode(r.json()["images"][0]), want) >= 60
    picture = _b64(controlled["pictures"][0])
    bad = httpx.post(f"{server.url}/v1/images", json=dict(body, controls=[{"name": "lines", "image": picture}]),
                     timeout=30)
    assert bad.status_code == 400 and "'lines'" in bad.json()["error"]["message"]
    bad = httpx.post(f"{server.url}/v1/images", json=dict(body, controls=[{"name": "edges", "image": "!"}]),
                     timeout=30)
    assert bad.status_code == 400 and "controls[0].image" in bad.json()["error"]["message"]


def test_a1111_controlnet_units_from_its_client(server, controlled):
    webuiapi = pytest.importorskip("webuiapi")
    # webuiapi writes ControlNet units into its mutable default alwayson_scripts={}, where they would stay for every
    # later call in this process (another test's server then gets a unit it never asked for): pass a fresh dict.
    fresh = dict
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=3)
    assert api.controlnet_model_list() == ["edges", "depth"]
    assert api.controlnet_module_list() == ["none", "canny"]
    picture = Image.open(controlled["pictures"][1])
    unit = webuiapi.ControlNetUnit(image=picture, module="none", model="depth [0f2a9c1e]", weight=1.2,
                                   guidance_start=0.1, guidance_end=0.9, resize_mode="Just Resize")
    result = api.txt2img(prompt="a fox", seed=9, cfg_scale=7.0, width=W, height=H, controlnet_units=[unit],
                         alwayson_scripts=fresh())
    want = server.pipe.generate("a fox", steps=3, seed=9, guidance=7.0, scheduler="euler_a", height=H, width=W,
                                controls=[("depth", picture, 1.2, 0.1, 0.9)]).images[0]
    assert images_psnr(np.asarray(result.image.convert("RGB")), want) >= 60
    canny = webuiapi.ControlNetUnit(image=picture, module="canny", model="edges", threshold_a=100, threshold_b=200,
                                    resize_mode="Just Resize")
    made = api.txt2img(prompt="a fox", seed=9, width=W, height=H, controlnet_units=[canny], alwayson_scripts=fresh())
    assert made.image.size == (W, H)
    with pytest.raises(RuntimeError, match="resize_mode"):
        api.txt2img(prompt="a fox", width=W, height=H,
                    controlnet_units=[webuiapi.ControlNetUnit(image=picture, model="edges")],  # Resize and Fill
                    alwayson_scripts=fresh())
