"""`sdrt serve` as a process: ready after warm-up, drains on SIGTERM (503 for new requests, accepted ones
finish, exit 0), one structured log line per request, one-line errors for bad options."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, assert_one_line_error, run_cli
from tests.serve.conftest import start_serve

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")


def test_sigterm_drains_then_exits_zero(sd1_engine):
    proc, url = start_serve(sd1_engine, "--drain-timeout", "60")
    try:
        job = httpx.post(f"{url}/v1/jobs", json=dict(prompt="drain me", steps=150, seed=1), timeout=10).json()["id"]
        with httpx.stream("GET", f"{url}/v1/jobs/{job}/events", timeout=120) as events:
            lines = events.iter_lines()
            for line in lines:
                if line.startswith("event: step"):
                    break
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while httpx.get(f"{url}/readyz", timeout=5).status_code != 503:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            late = httpx.post(f"{url}/v1/images", json=dict(prompt="late", steps=2), timeout=10)
            assert late.status_code == 503 and "draining" in late.json()["error"]["message"]
            final = [line for line in lines if line.startswith("event: ")][-1]
        assert final == "event: done"  # the accepted request finished
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    logged = [json.loads(line.split(" INFO ", 1)[1]) for line in err.splitlines() if '"event": "request"' in line]
    assert [(r["id"], r["outcome"]) for r in logged] == [(job, "completed")]
    assert "Traceback" not in err


def test_bad_options_are_one_line(sd1_engine, tmp_path):
    assert_one_line_error(run_cli("serve", tmp_path / "nope"), "nope")
    assert_one_line_error(run_cli("serve", sd1_engine, "--max-batch", "0"), "--max-batch 0")
    assert_one_line_error(run_cli("serve", sd1_engine, "--api-key-env", "SDRT_TEST_UNSET_VAR"),
                          "SDRT_TEST_UNSET_VAR")
    assert_one_line_error(run_cli("serve", sd1_engine, "--replicas", "2"), "--replicas", "--ray")
    assert_one_line_error(run_cli("serve", sd1_engine, "--ray", "--autoscale", "3:1"), "--autoscale 3:1", "MIN:MAX")
    assert_one_line_error(run_cli("serve", sd1_engine, "--ray", "--replicas", "0"), "--replicas 0")
    assert_one_line_error(run_cli("serve", sd1_engine, "--ray", "--replicas", "2", "--autoscale", "1:2"),
                          "--autoscale", "--replicas")


def test_serve_imports_no_torch():
    code = ("import sys, sdrt.serve, sdrt.serve.app, sdrt.serve.server, sdrt.serve.cli, sdrt.serve.ray_deployment\n"
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_loras_are_checked_before_serving_and_reach_the_pipeline(sd1_engine, lora_files, tmp_path):
    from sdrt.serve.server import ServeConfig, build_engine

    assert_one_line_error(run_cli("serve", sd1_engine, "--lora", tmp_path / "none.safetensors"),
                          "none.safetensors", "does not exist")
    lora = lora_files["sd1-tiny", "kohya"][1]
    engine = build_engine(ServeConfig(str(sd1_engine), loras=[(lora, 0.5)], warmup=False))
    try:
        assert [(f.path, s) for f, s in engine.pipeline.loras] == [(lora, 0.5)]
        job = engine.submit("a red circle", steps=2, seed=3, guidance=1.0)
        served = job.wait().images[0]
    finally:
        engine.close()
    from sdrt.runtime import Pipeline

    alone = Pipeline(sd1_engine, loras=[(lora, 0.5)]).generate("a red circle", steps=2, seed=3, guidance=1.0)
    np.testing.assert_array_equal(served, alone.images[0])


def test_serve_ray_without_ray_names_the_extra(sd1_engine):
    code = ("import sys\n"
            "class NoRay:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'ray' or name.startswith('ray.'):\n"
            "            raise ImportError('no ray here')\n"
            "sys.meta_path.insert(0, NoRay())\n"
            "from sdrt.cli import main\n"
            f"sys.exit(main(['serve', {str(sd1_engine)!r}, '--ray']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert_one_line_error(r, "ray is not installed", "pip install 'sdrt[ray]'")
