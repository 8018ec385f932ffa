"""`sdrt serve --ray` as a process: it starts a local Ray instance on loopback, serves the same API through
Ray's proxy, and on SIGTERM removes the application, stops Ray and exits 0, leaving no process behind."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.serve.conftest import start_serve

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")
if not os.environ.get("CI"):  # CI installs the ray extra: there this test must run
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")

pytestmark = pytest.mark.slow


def test_serve_ray_serves_and_stops_cleanly(shapes_engine):
    proc, url = start_serve(shapes_engine, "--ray", "--replicas", "1", "--max-batch", "2", ready_s=300)
    try:
        r = httpx.post(f"{url}/v1/images", json=dict(prompt="a red circle on a blue background", steps=5, seed=1),
                       timeout=120)
        assert r.status_code == 200 and r.headers["x-sdrt-replica"] and len(r.json()["images"]) == 1
        assert httpx.get(f"{url}/", timeout=30).status_code == 200
        family = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in family)  # its own local Ray instance
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 60
    while [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
        assert time.monotonic() < deadline, [p.cmdline()[:2] for p in family if p.is_running()]
        time.sleep(0.5)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/readyz", timeout=5)
