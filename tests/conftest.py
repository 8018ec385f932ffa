"""Session-scoped fixtures: tiny random checkpoints (made once) and their exported engine directories."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_KINDS = ("sd1-tiny", "sd2-tiny")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random checkpoints in the diffusers layout, by kind."""
    pytest.importorskip("diffusers")
    from tools.make_models import make_model

    base = tmp_path_factory.mktemp("models")
    return {kind: make_model(kind, base / kind, seed=0) for kind in TINY_KINDS}


@pytest.fixture(scope="session")
def sd1_model(model_dirs) -> Path:
    return model_dirs["sd1-tiny"]


@pytest.fixture(scope="session")
def sd2_model(model_dirs) -> Path:
    return model_dirs["sd2-tiny"]


@pytest.fixture(scope="session")
def engine_dirs(model_dirs, tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoints exported once per session (read-only for tests: copy before modifying)."""
    from sdrt.export import export_model

    base = tmp_path_factory.mktemp("engines")
    return {kind: (export_model(path, base / kind, progress=False, log=lambda m: None), base / kind)[1]
            for kind, path in model_dirs.items()}


@pytest.fixture(scope="session")
def sd1_engine(engine_dirs) -> Path:
    return engine_dirs["sd1-tiny"]


@pytest.fixture(scope="session")
def sd2_engine(engine_dirs) -> Path:
    return engine_dirs["sd2-tiny"]


@pytest.fixture(scope="session")
def shapes_engine(tmp_path_factory) -> Path:
    """The embedded trained model (models/shapes-32) exported once per session (read-only for tests)."""
    pytest.importorskip("diffusers")
    from sdrt.export import export_model

    engine = tmp_path_factory.mktemp("shapes") / "engine"
    export_model(ROOT / "models" / "shapes-32", engine, progress=False, log=lambda m: None)
    return engine


def run_cli(*args: str, timeout: float = 300, env: dict | None = None):
    """Run `python -m sdrt ARGS` in a subprocess; returns CompletedProcess with text output."""
    import subprocess

    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "sdrt", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=ROOT)


def assert_one_line_error(r, *needles):
    """A CLI user error: non-zero exit, exactly one line on stderr containing each needle, no traceback."""
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
