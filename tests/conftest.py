"""Session-scoped fixtures: tiny random checkpoints (made once) and their exported engine directories."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
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
def tiny_model(tmp_path_factory):
    """``tiny_model(kind) -> (model_dir, engine_dir)``: a tiny checkpoint of another kind (sdxl-tiny,
    sdxl-refiner-tiny, sdxl-turbo-tiny, sd-turbo-tiny, lcm-tiny), made and exported on first use, so only the
    tests that use one pay for it. Engine directories are read-only for tests."""
    pytest.importorskip("diffusers")
    built: dict[str, tuple[Path, Path]] = {}

    def build(kind: str) -> tuple[Path, Path]:
        if kind not in built:
            from sdrt.export import export_model
            from tools.make_models import make_model

            base = tmp_path_factory.mktemp(kind)
            model = make_model(kind, base / "model", seed=0)
            export_model(model, base / "engine", progress=False, log=lambda m: None)
            built[kind] = (model, base / "engine")
        return built[kind]

    return build


@pytest.fixture(scope="session")
def init_image_path(tmp_path_factory):
    """A structured picture of an odd size (resized by both pipelines' preprocessing)."""
    import numpy as np
    from PIL import Image

    h, w = 37, 45  # rounds down to 36x44: odd latents (9x11) for the 4x VAE
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xx * 5) % 256, (yy * 7) % 256, ((xx + yy) * 3) % 256], axis=-1).astype(np.uint8)
    path = tmp_path_factory.mktemp("img") / "init.png"
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture(scope="session")
def shapes_engine(tmp_path_factory) -> Path:
    """The embedded trained model (models/shapes-32) exported once per session with its tiny VAE decoder
    (read-only for tests)."""
    pytest.importorskip("diffusers")
    from sdrt.export import export_model

    engine = tmp_path_factory.mktemp("shapes") / "engine"
    export_model(ROOT / "models" / "shapes-32", engine, progress=False, log=lambda m: None,
                 tiny_vae=ROOT / "models" / "shapes-32-tiny-vae")  # the tiny VAE decoder trained for it
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


@contextmanager
def umask(mask: int):
    """Run the block (and the processes it starts) under ``mask``."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="session")
def lora_files(model_dirs, tmp_path_factory) -> dict[tuple[str, str], list[Path]]:
    """Two random LoRAs per (model kind, key format), UNet and text encoder: the first of rank 4 with alpha 2
    (scale 1/2, and the ResNets' 3x3 convolutions too), the second of rank 2 without alpha (scale 1)."""
    pytest.importorskip("diffusers")
    from tools.make_loras import make_lora

    base = tmp_path_factory.mktemp("loras")
    out = {}
    for kind, model in model_dirs.items():
        for fmt in ("kohya", "peft"):
            if fmt == "peft":
                pytest.importorskip("peft")
            out[kind, fmt] = [make_lora(model, base / f"{kind}-{fmt}-a.safetensors", fmt, rank=4, alpha=2.0, seed=3,
                                        conv=True),
                              make_lora(model, base / f"{kind}-{fmt}-b.safetensors", fmt, rank=2, seed=5)]
    return out


@pytest.fixture(scope="session")
def controlled(model_dirs, tmp_path_factory):
    """The tiny SD1 model exported with two ControlNets (edges, depth), and their folders and pictures."""
    pytest.importorskip("diffusers")
    import numpy as np
    from PIL import Image

    from sdrt.export import export_model
    from tools.make_models import make_controlnet

    base = tmp_path_factory.mktemp("controlnet")
    model = model_dirs["sd1-tiny"]
    nets = {name: make_controlnet(model, base / name, seed=seed) for name, seed in (("edges", 1), ("depth", 2))}
    engine = base / "engine"
    export_model(model, engine, progress=False, log=lambda m: None,
                 controlnets=[f"{nets['edges']}:edges", f"{nets['depth']}:depth"])
    rng = np.random.default_rng(1)
    pictures = []
    for i in range(2):
        path = base / f"cond{i}.png"
        Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(path)
        pictures.append(path)
    return {"model": model, "engine": engine, "nets": nets, "pictures": pictures, "base": base}


def served_with_calls(pipe, asks: list[dict], components) -> tuple[list, list[tuple[str, int]]]:
    """``asks`` submitted together to an Engine over ``pipe`` (its sessions loaded): each one's first picture,
    and the (component, samples) of every call of ``components`` the engine made."""
    from sdrt.serve import Engine

    calls: list[tuple[str, int]] = []
    for comp in components:
        run = pipe.sessions[comp].run
        pipe.sessions[comp].run = lambda feeds, comp=comp, run=run: (calls.append((comp, len(feeds["sample"]))),
                                                                     run(feeds))[1]
    engine = Engine(pipe, max_batch=8).start(warmup=False)
    try:
        jobs = [engine.submit(**a) for a in asks]
        return [j.wait(120).images[0] for j in jobs], calls
    finally:
        engine.close()
