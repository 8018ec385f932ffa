"""The serving engine and Pipeline.generate share one UNet caller (Pipeline.evaluate_unet): feature caching in
the service equals `sdrt generate --cache-interval`, alone and batched with requests at other steps, and no
UNet call goes past the backend's batch limit."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from sdrt.errors import UserError


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def cached_engine_dir(tmp_path_factory):
    """The trained shapes model with its feature-caching pair."""
    pytest.importorskip("diffusers")
    from sdrt.export import export_model
    from tests.conftest import ROOT

    path = tmp_path_factory.mktemp("shapes-cache") / "engine"
    export_model(ROOT / "models" / "shapes-32", path, components="text_encoder,unet,vae_decoder", cache_branch=1,
                 progress=False, log=lambda m: None)
    return path


def _after_steps(job, n: int) -> threading.Event:
    """An event set once ``job`` has finished ``n`` steps (or has its answer)."""
    reached = threading.Event()

    def listener(event):
        if (event["event"] == "step" and event["step"] >= n) or event["event"] in ("done", "error"):
            reached.set()
    job.subscribe(listener)
    return reached


def test_service_caching_equals_generate_alone_and_batched_at_other_steps(cached_engine_dir):
    from sdrt.runtime import Pipeline
    from sdrt.serve import Engine

    asks = [dict(prompt="a red circle on a blue background", steps=9, seed=1, scheduler="ddim"),
            dict(prompt="a green square on a black background", steps=7, seed=2, scheduler="euler_a"),
            dict(prompt="a yellow triangle on a white background", steps=6, seed=3, scheduler="dpmpp_2m")]
    reference = Pipeline(cached_engine_dir, cache_interval=2)
    want = [reference.generate(**a).images[0] for a in asks]

    calls: list[tuple[str, int]] = []
    pipe = Pipeline(cached_engine_dir, cache_interval=2)
    for comp in ("unet_deep", "unet_shallow"):
        session, run = pipe.sessions[comp], pipe.sessions[comp].run
        session.run = lambda feeds, comp=comp, run=run: (calls.append((comp, len(feeds["sample"]))), run(feeds))[1]
    engine = Engine(pipe, max_batch=8).start(warmup=False)
    try:
        alone = engine.submit(**asks[0]).wait(timeout=120)  # alone: nothing to share its calls
        first = engine.submit(**asks[0])
        _after_steps(first, 3).wait(timeout=60)
        later = [engine.submit(**a) for a in asks[1:]]  # admitted while the first is at step 3 or later
        got = [j.wait(timeout=120).images[0] for j in [first, *later]]
    finally:
        engine.close()
    assert psnr(alone.images[0], want[0]) >= 60
    for image, expected in zip(got, want):
        assert psnr(image, expected) >= 60
    # the requests shared UNet calls (a guided image is 2 samples), through both UNets of the pair
    assert max(n for _, n in calls) > 2
    assert {c for c, _ in calls} == {"unet_deep", "unet_shallow"}


class LimitedSession:
    """A CPU stand-in for a TensorRT plan whose profile takes at most ``limit`` samples: it says so through
    ``dim_limit``, as the TensorRT backend does, and refuses a larger batch as TensorRT would."""

    def __init__(self, inner, limit: int):
        self.inner, self.limit, self.batches = inner, limit, []
        self.inputs, self.outputs = inner.inputs, inner.outputs

    def dim_limit(self, name: str, axis: int):
        return self.limit if (name, axis) == ("sample", 0) else self.inner.dim_limit(name, axis)

    def run(self, feeds):
        n = len(feeds["sample"])
        if n > self.limit:
            raise RuntimeError(f"batch {n} outside the profile (at most {self.limit})")
        self.batches.append(n)
        return self.inner.run(feeds)

    def close(self):
        self.inner.close()


def _limited(engine_dir, limit: int):
    from sdrt.runtime import Pipeline

    pipe = Pipeline(engine_dir)
    pipe.sessions["unet"] = LimitedSession(pipe.sessions["unet"], limit)
    pipe.unet_batch_limit = limit   # what loading a limited backend's session sets
    return pipe


def test_a_max_batch_the_plans_cannot_take_is_refused_at_start(sd1_engine):
    from sdrt.serve import Engine

    pipe = _limited(sd1_engine, 4)
    with pytest.raises(UserError, match=r"max_batch 4: .*at most 4 samples per call .*--max-batch 2"):
        Engine(pipe, max_batch=4)
    assert Engine(pipe, max_batch=2).scheduler.max_batch == 2


def test_no_unet_call_goes_past_the_batch_limit(sd1_engine):
    from sdrt.runtime import Pipeline
    from sdrt.serve import Engine

    ask = dict(prompt="a red circle", steps=3, seed=5, num_images=3, guidance=7.5)  # 6 guided samples a step
    want = Pipeline(sd1_engine).generate(**ask).images
    pipe = _limited(sd1_engine, 4)
    alone = pipe.generate(**ask).images          # one request past the limit: split into calls of 4 and 2
    engine = Engine(pipe, max_batch=2).start(warmup=False)
    try:
        jobs = [engine.submit(**dict(ask, seed=s)) for s in (5, 6)]
        served = [j.wait(timeout=120).images for j in jobs]
    finally:
        engine.close()
    limited = pipe.sessions["unet"]
    assert max(limited.batches) == 4 and 2 in limited.batches
    for a, b in zip(alone + served[0], want + want):
        assert psnr(a, b) >= 60


def test_sdrt_serve_cache_interval_gives_sdrt_generate_s_pictures_and_parameters(cached_engine_dir, tmp_path):
    """The real commands: `sdrt serve --cache-interval 2` over loopback against `sdrt generate --cache-interval 2`."""
    import base64
    import io
    import subprocess
    import sys

    import httpx
    from PIL import Image

    from sdrt.runtime.images import read_png_parameters
    from tests.conftest import ROOT
    from tests.serve.conftest import start_serve

    ask = dict(steps=6, seed=11, guidance=7.0, scheduler="euler_a", num_images=2)
    prompt = "a blue square on a yellow background"
    r = subprocess.run([sys.executable, "-m", "sdrt", "generate", str(cached_engine_dir), prompt, "-q",
                        "-o", str(tmp_path / "g.png"), "--cache-interval", "2",
                        *[a for k, v in ask.items() for a in (f"--{k.replace('_', '-')}", str(v))]],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    generated = [np.asarray(Image.open(tmp_path / f"g-{i}.png").convert("RGB")) for i in range(2)]
    proc, url = start_serve(cached_engine_dir, "--cache-interval", "2", "--max-batch", "4")
    try:
        answer = httpx.post(f"{url}/v1/images", json=dict(prompt=prompt, **ask), timeout=300)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert answer.status_code == 200, answer.text
    served = [Image.open(io.BytesIO(base64.b64decode(b))) for b in answer.json()["images"]]
    for image, want, i in zip(served, generated, range(2)):
        assert psnr(np.asarray(image.convert("RGB")), want) >= 60
        assert image.text["parameters"] == read_png_parameters(tmp_path / f"g-{i}.png")
