"""The Ray Serve deployment on a real local Ray instance, started and stopped by this module, loopback only.

Two replicas both serve, and their pictures equal the single-process service's; a job's calls reach the
replica that owns it; a rolling change of the deployment serves without a failed request; a replica whose
process is killed is restarted by Ray, the requests it held get a clear 503 (none hangs) and the others
succeed; Ray's backpressure is the service's 429. Needs the `ray` extra (skipped without it, except in CI).
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

from sdrt.serve.ray_deployment import LOCAL_ENV, PROXY_ENV, REPLICA_GONE, REPLICA_HEADER, ProxyErrors

for _key, _value in LOCAL_ENV.items():  # read when ray is imported: a local instance on loopback only
    os.environ.setdefault(_key, _value)

from sdrt.runtime.images import images_psnr  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.serve.conftest import LiveServer, free_port, make_service  # noqa: E402

httpx = pytest.importorskip("httpx")
if os.environ.get("CI"):
    import ray  # noqa: F401  (CI installs the ray extra: these tests must run there)
ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
from ray import serve  # noqa: E402

from sdrt.serve.ray_deployment import APP_NAME, DEPLOYMENT_NAME, build_app  # noqa: E402
from sdrt.serve.server import ServeConfig  # noqa: E402

pytestmark = pytest.mark.slow
PROMPTS = ["a red circle on a blue background", "a yellow square on a black background",
           "a white triangle on a green background", "a blue circle on a yellow background"]


# ---- without Ray running ------------------------------------------------------------------------------------

def _through(app, scope_type="http"):
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.disconnect"}

    asyncio.run(ProxyErrors(app)({"type": scope_type}, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], headers, body


def _answer(status, headers, body):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    return app


def test_proxy_errors_speak_as_the_service():
    async def no_answer(scope, receive, send):  # what Ray's proxy does when the replica died
        return None

    status, headers, body = _through(no_answer)
    assert status == 503 and headers["retry-after"] == "1" and json.loads(body)["error"]["message"] == REPLICA_GONE

    ray_429 = _answer(429, [(b"retry-after", b"2"), (b"content-type", b"text/plain")],
                      b"Request dropped due to backpressure (num_queued_requests=1, max_queued_requests=1).")
    status, headers, body = _through(ray_429)
    error = json.loads(body)["error"]
    assert status == 429 and headers["retry-after"] == "2" and error["type"] == "rate_limit_error"
    assert "max_queued_requests=1" in error["message"] and json.loads(body)["detail"] == error["message"]

    replica_429 = _answer(429, [(REPLICA_HEADER.encode(), b"abc"), (b"retry-after", b"7")], b'{"error": "as is"}')
    assert _through(replica_429) == (429, {REPLICA_HEADER: "abc", "retry-after": "7"}, b'{"error": "as is"}')
    replica_500 = _answer(500, [], b"Internal Server Error")  # a replica's own 500 is not a dead replica
    assert _through(replica_500)[0] == 500


def test_health_check_fails_when_the_engine_is_broken():
    from sdrt.serve.app import Service
    from sdrt.serve.ray_deployment import SdrtReplica

    class Engine:
        broken = None
        ready = True

    class Probe(SdrtReplica):
        def __del__(self):  # only Ray calls the real one (it awaits it)
            pass

    replica = object.__new__(Probe)  # as Ray holds it, without loading a pipeline
    replica.service = Service(Engine())
    replica.check_health()
    replica.service.engine.broken = "the engine's worker stopped: RuntimeError: boom"
    with pytest.raises(RuntimeError, match="worker stopped"):
        replica.check_health()


def test_deployment_is_sized_from_the_engine():
    from sdrt.serve.ray_deployment import deployment_options, parse_autoscale

    options = deployment_options(ServeConfig("x", max_batch=6, max_queue=20), autoscale=parse_autoscale("1:4"))
    assert options["max_ongoing_requests"] == 12 and options["max_queued_requests"] == 20
    assert options["autoscaling_config"]["target_ongoing_requests"] == 6
    assert options["backpressure_config"]["status_code"] == 429 and "num_replicas" not in options
    assert deployment_options(ServeConfig("x"), replicas=3)["num_replicas"] == 3


def test_router_reads_the_owner_from_a_job_path():
    import pickle
    from types import SimpleNamespace

    from ray.serve._private.common import StreamingHTTPRequest
    from sdrt.serve.ray_router import job_owner

    def request(path):
        arg = pickle.dumps(StreamingHTTPRequest(asgi_scope={"path": path, "root_path": ""}, proxy_actor_name="p"))
        return SimpleNamespace(args=[arg])

    job = "abc123xy-" + "0" * 32
    assert job_owner(request(f"/v1/jobs/{job}")) == "abc123xy"
    assert job_owner(request(f"/v1/jobs/{job}/events")) == "abc123xy"
    assert job_owner(request("/v1/jobs")) is None and job_owner(request("/v1/images")) is None
    assert job_owner(request("/v1/jobs/" + "0" * 32)) is None  # a single-process id: anyone answers
    assert job_owner(SimpleNamespace(args=[b"not a pickle /v1/jobs/"])) is None


# ---- on a local Ray instance ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_url():
    saved = dict(os.environ)
    # Ray's workers import sdrt from this checkout, and its proxy words its own errors as the service does
    os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), saved.get("PYTHONPATH")])), **PROXY_ENV)
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=4,
             log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def _deploy(engine, replicas=2, **settings) -> None:
    config = ServeConfig(str(engine), max_queue=16, **settings)
    serve.run(build_app(config, replicas=replicas, num_cpus=1), name=APP_NAME, route_prefix="/")


def _post_all(url, bodies, path="/v1/images", timeout=300) -> list:
    """Send the bodies at once, one thread each; every answer as (status, replica, body), in order."""
    answers = [None] * len(bodies)

    def send(i):
        try:
            r = httpx.post(f"{url}{path}", json=bodies[i], timeout=timeout)
            answers[i] = (r.status_code, r.headers.get(REPLICA_HEADER), r.headers.get("retry-after"), r.json())
        except httpx.HTTPError as e:
            answers[i] = (f"transport error: {type(e).__name__}", None, None, None)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    assert not any(t.is_alive() for t in threads), "a request hung"
    return answers


def _pixels(b64: str) -> np.ndarray:
    import base64

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _replicas(url, want: int, deadline_s: float = 180) -> set[str]:
    """The ids of the replicas answering, once `want` distinct ones have answered /readyz."""
    seen: set[str] = set()
    deadline = time.monotonic() + deadline_s
    while len(seen) < want:
        assert time.monotonic() < deadline, f"only replicas {seen} answered"
        r = httpx.get(f"{url}/readyz", timeout=30)
        if r.status_code == 200:
            seen.add(r.headers[REPLICA_HEADER])
    return seen


def _peers_of_this_process_tree() -> list[str]:
    import psutil

    pids = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
    peers = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.pid in pids and conn.raddr:
            peers.append(conn.raddr.ip)
    return peers


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def test_two_replicas_serve_the_api_and_pictures_equal_the_single_process_service(ray_url, shapes_engine):
    _deploy(shapes_engine, replicas=2, max_batch=2)
    bodies = [dict(prompt=PROMPTS[i % 4], steps=25, guidance=7.5, scheduler="ddim", seed=i) for i in range(8)]
    answers = _post_all(ray_url, bodies)
    assert [a[0] for a in answers] == [200] * 8, answers
    assert len({a[1] for a in answers}) == 2  # both replicas served

    from sdrt.runtime import Pipeline
    from sdrt.serve.app import create_app
    from sdrt.serve.server import model_name

    pipe = Pipeline(shapes_engine)
    service = make_service(pipe, max_batch=2)
    service.model_name = model_name(str(shapes_engine))  # as the replicas name it in the parameters
    try:
        with LiveServer(create_app(service)) as single:
            alone = _post_all(single.url, bodies)
    finally:
        service.engine.close()
        pipe.close()
    for (_, _, _, got), (status, _, _, want) in zip(answers, alone):
        assert status == 200 and got["parameters"] == want["parameters"]
        assert images_psnr(_pixels(got["images"][0]), _pixels(want["images"][0])) >= 60.0

    # a job's calls reach the replica that owns it (its id starts with the owner's replica id)
    jobs = _post_all(ray_url, [dict(b, steps=10, preview_every=5) for b in bodies[:6]], path="/v1/jobs")
    for status, replica, _, job in jobs:
        assert status == 202 and job["id"].startswith(f"{replica}-")
        with httpx.stream("GET", f"{ray_url}{job['events']}", timeout=120) as events:
            assert events.headers[REPLICA_HEADER] == replica
            kinds = [line for line in events.iter_lines() if line.startswith("event: ")]
        assert kinds[-1] == "event: done" and kinds.count("event: step") == 10
        state = httpx.get(f"{ray_url}/v1/jobs/{job['id']}", timeout=30)
        assert state.status_code == 200 and state.json()["state"] == "completed"
        assert httpx.delete(f"{ray_url}/v1/jobs/{job['id']}", timeout=30).status_code == 409  # found, finished

    assert httpx.get(f"{ray_url}/", timeout=30).status_code == 200  # the playground too
    peers = _peers_of_this_process_tree()
    assert peers and all(_is_loopback(ip) for ip in peers), sorted(set(peers))


def test_rolling_update_serves_without_a_failed_request(ray_url, shapes_engine):
    _deploy(shapes_engine, replicas=2, max_batch=2)
    before = _replicas(ray_url, 2)
    stop = threading.Event()
    answers: list = []

    def client(k):
        with httpx.Client(timeout=300) as http:
            for n in range(200):  # bounded; stopped once the new version has served a while
                if stop.is_set():
                    return
                r = http.post(f"{ray_url}/v1/images", json=dict(prompt=PROMPTS[k], steps=10, seed=n))
                answers.append((time.monotonic(), r.status_code, r.headers.get(REPLICA_HEADER)))

    clients = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in clients:
        t.start()
    try:
        while len(answers) < 6:
            time.sleep(0.05)
        _deploy(shapes_engine, replicas=2, max_batch=4)  # a new version: replicas replaced one by one
        switched = time.monotonic()
        deadline = switched + 120
        while sum(1 for t, _, replica in answers if t > switched and replica not in before) < 6:
            assert time.monotonic() < deadline, "the new replicas served nothing"
            time.sleep(0.05)
    finally:
        stop.set()
        for t in clients:
            t.join(330)
    assert not any(t.is_alive() for t in clients)
    assert [status for _, status, _ in answers] == [200] * len(answers)
    served_by = {replica for _, _, replica in answers}
    assert served_by & before and served_by - before  # old replicas served, then new ones
    assert not before & _replicas(ray_url, 2)  # the old ones are gone


def test_killed_replica_is_restarted_its_requests_fail_clearly_and_others_succeed(ray_url, shapes_engine):
    _deploy(shapes_engine, replicas=2, max_batch=2)
    replicas = _replicas(ray_url, 2)
    # a long job on one replica, its event stream held open: that replica's process will be killed
    job = httpx.post(f"{ray_url}/v1/jobs", json=dict(prompt=PROMPTS[0], steps=150, seed=1), timeout=30).json()
    victim = job["id"].split("-")[0]
    handle = ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#{victim}", namespace="serve")
    pid = ray.get(handle.__ray_call__.remote(lambda actor: os.getpid()))
    stream_events: list[str] = []
    running = threading.Event()

    def follow():
        try:
            with httpx.stream("GET", f"{ray_url}{job['events']}", timeout=120) as events:
                for line in events.iter_lines():
                    if line.startswith("event: "):
                        stream_events.append(line)
                        if line == "event: step":
                            running.set()
        except httpx.HTTPError as e:  # the replica's end of the stream went away with it
            stream_events.append(f"closed: {type(e).__name__}")

    follower = threading.Thread(target=follow)
    follower.start()
    assert running.wait(60)
    bodies = [dict(prompt=PROMPTS[i % 4], steps=100, seed=i) for i in range(6)]
    held: list = []
    sender = threading.Thread(target=lambda: held.extend(_post_all(ray_url, bodies)))
    sender.start()
    deadline = time.monotonic() + 60
    while not any(r.status_code == 200 and r.json()["running"] > 1 for r in
                  [httpx.get(f"{ray_url}/readyz", timeout=30) for _ in range(4)]):
        assert time.monotonic() < deadline, "the requests never started"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    sender.join(400)
    follower.join(130)
    assert not sender.is_alive() and not follower.is_alive(), "a request hung"

    assert "event: done" not in stream_events  # the stream ended with its replica (cut off, or closed)
    ok = [a for a in held if a[0] == 200]
    failed = [a for a in held if a[0] != 200]
    assert ok and all(a[1] != victim for a in ok), held
    for status, _, retry_after, body in failed:
        assert status == 503 and retry_after == "1" and body["error"]["message"] == REPLICA_GONE, (status, body)

    restarted = _replicas(ray_url, 2)  # Ray replaced the dead replica
    assert victim not in restarted and restarted & replicas
    gone = httpx.get(f"{ray_url}/v1/jobs/{job['id']}", timeout=30)
    assert gone.status_code == 404 and job["id"] in gone.json()["error"]["message"]
    again = _post_all(ray_url, [dict(prompt=PROMPTS[0], steps=5, seed=i) for i in range(4)])
    assert [a[0] for a in again] == [200] * 4


def test_backpressure_is_the_services_429(ray_url, shapes_engine):
    serve.run(build_app(ServeConfig(str(shapes_engine), max_batch=1, max_queue=1), replicas=1, num_cpus=1),
              name=APP_NAME, route_prefix="/")
    answers = _post_all(ray_url, [dict(prompt=PROMPTS[1], steps=40, seed=i) for i in range(8)])
    statuses = sorted(a[0] for a in answers)
    assert set(statuses) == {200, 429}, statuses  # every request answered: a picture or a 429
    for status, _, retry_after, body in answers:
        if status == 429:
            assert retry_after == "2" and body["error"]["type"] == "rate_limit_error"
            assert "queue" in body["error"]["message"] and body["detail"] == body["error"]["message"]
