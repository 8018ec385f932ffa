"""A real uvicorn server on a loopback port, started and stopped by the test (in a thread, on its own loop)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT
from tools.ports import free_port  # noqa: F401 - test_ray imports it from here

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def start_serve(engine_dir, *args, env=None, ready_s: float = 120):
    """`sdrt serve ENGINE_DIR ARGS` as a child process on a free loopback port, once /readyz answers 200:
    (process, base URL). The caller stops it."""
    import httpx

    port = free_port()
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "sdrt", "serve", str(engine_dir), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_s
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "not ready in time"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)


class LiveServer:
    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="module")
def serve_pipe(sd1_engine):
    from sdrt.runtime import Pipeline

    pipe = Pipeline(sd1_engine, load_encoder=True)
    yield pipe
    pipe.close()


def make_service(pipe, api_key=None, **engine_options):
    from sdrt.serve import Engine
    from sdrt.serve.app import Service

    options = dict(max_batch=8, max_queue=16, timeout=120)
    options.update(engine_options)
    return Service(Engine(pipe, **options).start(), api_key=api_key, model_name="sd1-tiny")


@pytest.fixture(scope="module")
def live(serve_pipe):
    """The native service over the tiny SD1 engine, shared by the tests of a module."""
    from sdrt.serve.app import create_app

    service = make_service(serve_pipe)
    with LiveServer(create_app(service)) as server:
        server.service = service
        yield server
    service.engine.close()
