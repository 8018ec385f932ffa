"""The settings table through the native HTTP request: every native field with the table's default, each bad
value a 4xx naming the field; and `sdrt generate` and the service write the same PNG `parameters` text."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from sdrt.runtime.images import read_png_parameters
from sdrt.runtime.settings import TABLE, shown
from tests.conftest import run_cli

httpx = pytest.importorskip("httpx")


def test_the_native_request_takes_every_native_setting_with_the_tables_default():
    from pydantic_core import PydanticUndefined

    from sdrt.serve.schemas import ImageRequest

    fields = ImageRequest.model_fields
    assert list(fields) == [s.native for s in TABLE if s.native]
    for s in TABLE:
        if s.native:
            assert fields[s.native].default == (PydanticUndefined if s.required else s.default), s.name
    assert ImageRequest.model_config["extra"] == "forbid" and ImageRequest.model_config["strict"]


@pytest.mark.parametrize("name, bad", [(s.native, bad) for s in TABLE if s.native for bad in s.bad], ids=shown)
def test_each_bad_value_is_a_4xx_naming_the_field(live, name, bad):
    body = {"prompt": "x", "steps": 2, name: bad}
    r = httpx.post(f"{live.url}/v1/jobs", json=body, timeout=30)
    assert r.status_code in (400, 422), r.text
    message = r.json()["error"]["message"]
    assert name.split("_")[0] in message and "\n" not in message, message


def test_generate_and_the_service_write_the_same_parameters(live, sd1_engine, tmp_path):
    from sdrt.serve.server import model_name

    settings = dict(negative_prompt="blurry, dark", steps=2, guidance=6.5, guidance_rescale=0.5, seed=7,
                    scheduler="euler", num_images=2, height=24, width=32, weighting=False)
    r = run_cli("generate", sd1_engine, "a red: circle", "-o", tmp_path / "o.png", "-q", "--no-weighting",
                *[a for k, v in settings.items() if k != "weighting" for a in (f"--{k.replace('_', '-')}", v)])
    assert r.returncode == 0, r.stderr
    cli = [read_png_parameters(tmp_path / f"o-{i}.png") for i in range(2)]
    assert "Guidance rescale: 0.5" in cli[0] and "Emphasis: None" in cli[0] and "Batch pos: 1" in cli[1]

    old = live.service.model_name
    live.service.model_name = model_name(str(sd1_engine))   # as `sdrt serve ENGINE_DIR` names it
    try:
        answer = httpx.post(f"{live.url}/v1/images", json=dict(prompt="a red: circle", **settings), timeout=60)
    finally:
        live.service.model_name = old
    assert answer.status_code == 200, answer.text
    assert answer.json()["parameters"] == cli
    for b64, text in zip(answer.json()["images"], cli):
        assert Image.open(io.BytesIO(base64.b64decode(b64))).text["parameters"] == text


def test_the_tables_a1111_and_openai_names_are_fields_of_their_requests():
    from sdrt.serve.schemas import OPENAI_EXTRA, A1111Request, OpenAIImageRequest

    for s in TABLE:
        assert s.a1111 is None or s.a1111 in A1111Request.model_fields, s.name
        assert s.openai is None or s.openai in OpenAIImageRequest.model_fields, s.name
    assert OPENAI_EXTRA == ("steps", "guidance", "seed", "scheduler")
