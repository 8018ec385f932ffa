"""The HTTP service against a real uvicorn server on a loopback port, through real clients (httpx, OpenAI's
client, the A1111 client webuiapi): every endpoint, cancellation by id and by disconnect, deadlines, 429,
auth, metrics, and images equal to the same requests run alone through the Pipeline."""

from __future__ import annotations

import base64
import io
import json
import socket
import time

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.images import images_psnr

from tests.serve.conftest import LiveServer, make_service

httpx = pytest.importorskip("httpx")

PSNR_FLOOR_DB = 60.0


def _png(b64: str) -> tuple[np.ndarray, dict]:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    return np.asarray(image.convert("RGB")), dict(image.text)


def _alone(pipe, prompt, **settings):
    return pipe.generate(prompt, settings.pop("negative_prompt", None), **settings).images


def _sse(lines) -> list[dict]:
    """Parse server-sent events from an iterator of lines (``response.iter_lines()``)."""
    events, kind = [], None
    for line in lines:
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            events.append({"kind": kind, **json.loads(line[len("data: "):])})
    return events


def test_native_images_equal_the_pipeline(live, serve_pipe):
    body = dict(prompt="a red circle on a blue background", negative_prompt="blurry", steps=5, guidance=7.5, seed=11,
                scheduler="dpmpp_2m", num_images=2, height=24, width=40)
    r = httpx.post(f"{live.url}/v1/images", json=body, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["seeds"] == [11] and len(answer["images"]) == 2
    ref = _alone(serve_pipe, **body)
    for i, (b64, want) in enumerate(zip(answer["images"], ref)):
        got, text = _png(b64)
        assert got.shape == (24, 40, 3) and images_psnr(got, want) >= PSNR_FLOOR_DB
        assert text["parameters"] == answer["parameters"][i]
        assert "Seed: 11" in text["parameters"] and "Size: 40x24" in text["parameters"]
    timings = answer["timings"]
    assert timings["unet_evaluations"] == 5 and timings["total_ms"] >= timings["unet_ms"] > 0
    assert {"queue_ms", "text_encoder_ms", "vae_decode_ms", "response_ms"} <= set(timings)


def test_native_img2img_with_base64(live, serve_pipe):
    rgb = (np.indices((28, 36)).sum(0)[..., None] * np.array([5, 3, 7]) % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    r = httpx.post(f"{live.url}/v1/images", json=dict(prompt="a square", steps=6, seed=3, init_image=b64,
                                                       strength=0.5, scheduler="euler"), timeout=60)
    assert r.status_code == 200, r.text
    from sdrt.runtime.images import load_init_image

    init = load_init_image(buf.getvalue(), serve_pipe.model.vae_scale_factor)
    ref = serve_pipe.generate("a square", steps=6, seed=3, init_image=init, strength=0.5, scheduler="euler").images
    got, text = _png(r.json()["images"][0])
    assert images_psnr(got, ref[0]) >= PSNR_FLOOR_DB and "Denoising strength: 0.5" in text["parameters"]


def test_job_events_stream_progress_previews_and_result(live):
    r = httpx.post(f"{live.url}/v1/jobs", json=dict(prompt="a star", steps=6, seed=2, scheduler="ddim",
                                                     preview_every=2), timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    with httpx.stream("GET", f"{live.url}/v1/jobs/{job_id}/events", timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse(response.iter_lines())
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "queued" and "started" in kinds and kinds[-1] == "done"
    assert [e["step"] for e in events if e["kind"] == "step"] == [1, 2, 3, 4, 5, 6]
    done = events[-1]
    assert done["seeds"] == [2] and _png(done["images"][0])[0].shape[2] == 3
    state = httpx.get(f"{live.url}/v1/jobs/{job_id}", timeout=10).json()
    assert state["state"] == "completed" and state["images"] == done["images"]


def test_cancel_by_id(live):
    job_id = httpx.post(f"{live.url}/v1/jobs", json=dict(prompt="x", steps=150, seed=1), timeout=30).json()["id"]
    with httpx.stream("GET", f"{live.url}/v1/jobs/{job_id}/events", timeout=60) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("event: step"):
                break
        r = httpx.delete(f"{live.url}/v1/jobs/{job_id}", timeout=10)
        assert r.status_code == 202 and r.json()["cancel_requested"]
        rest = _sse(lines)
    assert rest[-1]["kind"] == "error" and rest[-1]["outcome"] == "cancelled"
    state = httpx.get(f"{live.url}/v1/jobs/{job_id}", timeout=10).json()
    assert state["state"] == "cancelled"
    assert httpx.delete(f"{live.url}/v1/jobs/{job_id}", timeout=10).status_code == 409
    assert httpx.delete(f"{live.url}/v1/jobs/nope", timeout=10).status_code == 404
    assert httpx.get(f"{live.url}/v1/jobs/nope/events", timeout=10).status_code == 404


def test_client_disconnect_cancels_its_request(live):
    engine = live.service.engine

    def jobs():
        with engine._cv:  # the worker may add or forget jobs meanwhile
            return list(engine._jobs.values())

    before = {j.id for j in jobs()}
    body = json.dumps(dict(prompt="disconnect me", steps=150, seed=1)).encode()
    with socket.create_connection(("127.0.0.1", live.port)) as s:
        s.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while not (new := [j for j in jobs() if j.id not in before and j.tag == "native"]):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        job = new[0]
        while not job.timings["unet_step_ms"]:
            time.sleep(0.01)
    with pytest.raises(Exception):
        job.wait(30)
    assert job.outcome == "cancelled" and len(job.timings["unet_step_ms"]) < 150


def test_deadline_is_504(serve_pipe):
    """The deadline passes during the first UNet call (the engine's clock jumps there), so the request is
    answered at the step boundary after it, whatever this machine's speed."""
    from sdrt.serve.app import create_app

    jump, slow = [0.0], [False]

    class SlowPipe:   # the real pipeline, whose UNet evaluation takes 1000 s on the engine's clock once slow
        def __getattr__(self, name):
            return getattr(serve_pipe, name)

        def evaluate_unet(self, loops):
            jump[0] += 1000.0 if slow[0] else 0.0
            return serve_pipe.evaluate_unet(loops)

    service = make_service(SlowPipe(), clock=lambda: time.monotonic() + jump[0])   # warms up at normal speed
    slow[0] = True
    try:
        with LiveServer(create_app(service)) as server:
            r = httpx.post(f"{server.url}/v1/images", json=dict(prompt="x", steps=5, seed=1, timeout=60), timeout=60)
    finally:
        service.engine.close()
    assert r.status_code == 504 and "deadline" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, status, needle", [
    (dict(prompt="x", steps="5"), 422, "steps"),
    (dict(prompt="x", guidance="7.5"), 422, "guidance"),
    (dict(prompt=None), 422, "prompt"),
    (dict(prompt="x", stepz=5), 422, "stepz"),
    (dict(steps=5), 422, "prompt"),
    (dict(prompt="x", steps=151), 400, "steps 151"),
    (dict(prompt="x", num_images=9), 400, "num_images 9"),
    (dict(prompt="x", height=33), 400, "height 33"),
    (dict(prompt="x", height=4096, width=4096), 400, "pixels"),
    (dict(prompt="x", scheduler="eular"), 400, "eular"),
    (dict(prompt="x", init_image="not base64!"), 400, "init_image"),
    (dict(prompt="x", init_image=base64.b64encode(b"not a picture").decode()), 400, "init image"),
    (dict(prompt="x", strength=0.5), 400, "strength"),
    (dict(prompt="x", timeout=1e9), 400, "timeout"),
    (dict(prompt="x", guidance=-1.0), 400, "guidance"),
    (dict(prompt="x", seed=-5), 400, "seed"),
])
def test_bad_input_is_a_4xx_naming_the_field(live, body, status, needle):
    r = httpx.post(f"{live.url}/v1/images", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"] and needle in r.json()["detail"]


def test_malformed_json_is_422(live):
    r = httpx.post(f"{live.url}/v1/images", content=b"{bad", headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 422 and "JSON" in r.json()["error"]["message"]


def test_queue_full_is_429_and_nothing_half_accepted(serve_pipe):
    from sdrt.serve.app import create_app

    service = make_service(serve_pipe, max_batch=1, max_queue=1)
    try:
        with LiveServer(create_app(service)) as server:
            url = server.url
            busy = httpx.post(f"{url}/v1/jobs", json=dict(prompt="busy", steps=150, seed=1), timeout=10).json()["id"]
            while service.engine.get(busy).state == "queued":
                time.sleep(0.01)
            queued = httpx.post(f"{url}/v1/jobs", json=dict(prompt="queued", steps=2, seed=1), timeout=10)
            assert queued.status_code == 202
            r = httpx.post(f"{url}/v1/images", json=dict(prompt="one too many", steps=2), timeout=10)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            r = httpx.post(f"{url}/sdapi/v1/txt2img", json=dict(prompt="batch", steps=2, batch_size=2), timeout=10)
            assert r.status_code in (400, 429)
            assert service.engine.counts()[0] == 1  # only the one queued job waits
            httpx.delete(f"{url}/v1/jobs/{busy}", timeout=10)
            state = httpx.get(f"{url}/v1/jobs/{queued.json()['id']}", timeout=10).json()
            deadline = time.monotonic() + 30
            while state["state"] != "completed":
                assert time.monotonic() < deadline
                time.sleep(0.05)
                state = httpx.get(f"{url}/v1/jobs/{queued.json()['id']}", timeout=10).json()
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
            assert 'sdrt_requests_total{outcome="rejected"} 2.0' in metrics
    finally:
        service.engine.close()


def test_api_key(serve_pipe):
    from sdrt.serve.app import create_app

    service = make_service(serve_pipe, max_queue=4)
    service.api_key = "s3cret"
    try:
        with LiveServer(create_app(service)) as server:
            body = dict(prompt="x", steps=2, seed=1)
            assert httpx.post(f"{server.url}/v1/images", json=body, timeout=30).status_code == 401
            r = httpx.post(f"{server.url}/v1/images", json=body, headers={"Authorization": "Bearer wrong"}, timeout=30)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            r = httpx.post(f"{server.url}/v1/images", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=30)
            assert r.status_code == 200
            assert httpx.get(f"{server.url}/v1/jobs/x", timeout=10).status_code == 401
            assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200   # probes need no key
            assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    finally:
        service.engine.close()


def test_health_ready_and_metrics(live):
    assert httpx.get(f"{live.url}/healthz", timeout=10).json()["status"] == "ok"
    assert httpx.get(f"{live.url}/readyz", timeout=10).json()["status"] == "ready"
    httpx.post(f"{live.url}/v1/images", json=dict(prompt="x", steps=3, seed=1), timeout=30)
    text = httpx.get(f"{live.url}/metrics", timeout=10).text
    for name in ("sdrt_requests_total", "sdrt_num_requests_waiting", "sdrt_num_requests_running",
                 "sdrt_request_queue_time_seconds", "sdrt_e2e_request_latency_seconds",
                 "sdrt_time_to_first_step_seconds", "sdrt_step_duration_seconds", "sdrt_unet_batch_size",
                 'sdrt_stage_duration_seconds_count{stage="text_encoder"}',
                 'sdrt_stage_duration_seconds_count{stage="vae_decoder"}',
                 'sdrt_stage_duration_seconds_count{stage="response"}'):
        assert name in text, name
    completed = float(text.split('sdrt_requests_total{outcome="completed"} ')[1].split()[0])
    assert completed >= 1
    steps = float(text.split("sdrt_step_duration_seconds_count ")[1].split()[0])
    assert steps >= 3


def test_not_ready_and_broken_are_503(serve_pipe):
    from sdrt.serve.app import Service, create_app

    service = Service(model_name="x")  # no engine yet: loading
    with LiveServer(create_app(service)) as server:
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 503
        r = httpx.post(f"{server.url}/v1/images", json=dict(prompt="x"), timeout=10)
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        service.load_error = "engine_dir: corrupt"
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 503


def test_engine_failure_is_500_and_service_goes_on(live, serve_pipe):
    original = serve_pipe.sessions["unet"]

    class Broken:
        def run(self, feeds):
            from sdrt.errors import StageError

            raise StageError("unet: onnxruntime failed (injected)")

    serve_pipe.sessions["unet"] = Broken()
    try:
        r = httpx.post(f"{live.url}/v1/images", json=dict(prompt="x", steps=2, seed=1), timeout=30)
        assert r.status_code == 500 and "injected" in r.json()["error"]["message"]
    finally:
        serve_pipe.sessions["unet"] = original
    assert httpx.post(f"{live.url}/v1/images", json=dict(prompt="x", steps=2, seed=1), timeout=30).status_code == 200


# ---- compatibility, through the real client libraries ---------------------------------------------------------

def test_a1111_client_txt2img_and_img2img(live, serve_pipe):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=live.port, sampler="Euler a", steps=4)
    result = api.txt2img(prompt="a red circle", negative_prompt="blurry", seed=40, cfg_scale=6.0, width=32,
                         height=24, batch_size=2)
    assert len(result.images) == 2 and result.images[0].size == (32, 24)
    assert result.info["all_seeds"] == [40, 41] and result.info["sampler_name"] == "Euler a"
    for seed, image in zip((40, 41), result.images):
        want = _alone(serve_pipe, "a red circle", negative_prompt="blurry", steps=4, guidance=6.0, seed=seed,
                      scheduler="euler_a", height=24, width=32)[0]
        assert images_psnr(np.asarray(image.convert("RGB")), want) >= PSNR_FLOOR_DB
    assert "Sampler: Euler a" in result.info["infotexts"][0]

    karras = api.txt2img(prompt="a square", seed=5, sampler_name="DPM++ 2M", scheduler="Karras", width=32, height=32)
    want = _alone(serve_pipe, "a square", steps=4, guidance=7.0, seed=5, scheduler="dpmpp_2m_karras")[0]
    assert images_psnr(np.asarray(karras.image.convert("RGB")), want) >= PSNR_FLOOR_DB

    init = Image.fromarray((np.indices((32, 32)).sum(0)[..., None] * np.array([3, 5, 7]) % 256).astype(np.uint8))
    out = api.img2img(images=[init], prompt="a blue star", seed=9, denoising_strength=0.6, width=32, height=32)
    assert out.image.size == (32, 32) and out.info["denoising_strength"] == 0.6

    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="x", sampler_name="Restart", width=32, height=32)
    assert e.value.args[0] == 400 and "Euler a" in e.value.args[1]
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="x", enable_hr=True, width=32, height=32)
    assert e.value.args[0] == 400 and "enable_hr" in e.value.args[1]
    assert "Euler a" in [s["name"] for s in api.get_samplers()]


def test_openai_client(live, serve_pipe):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    out = client.images.generate(model="sdrt", prompt="a green triangle", n=2, size="40x24",
                                 response_format="b64_json", extra_body={"steps": 4, "seed": 8})
    assert len(out.data) == 2
    want = _alone(serve_pipe, "a green triangle", steps=4, seed=8, num_images=2, height=24, width=40)
    for datum, ref in zip(out.data, want):
        assert images_psnr(_png(datum.b64_json)[0], ref) >= PSNR_FLOOR_DB
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", response_format="url")
    assert "b64_json" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.images.generate(prompt="x", size="big")
