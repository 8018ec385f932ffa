"""Prove the base install is torch-free: `pip install .` into a fresh venv, then `sdrt generate` there.

    .venv/bin/python tools/base_install_check.py

The engine directory is exported with this (full) environment; the fresh venv gets only the runtime
dependencies and must not be able to import torch, transformers or diffusers.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, **kw):
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(list(map(str, cmd)), check=True, **kw)


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from sdrt.export import export_model
    from tools.make_models import make_model

    work = Path(tempfile.mkdtemp(prefix="sdrt-base-"))
    try:
        model = make_model("sd1-tiny", work / "model")
        engine = work / "engine"
        export_model(model, engine, progress=False)
        env_dir = work / "venv"
        venv.create(env_dir, with_pip=True)
        py = env_dir / "bin" / "python"
        run([py, "-m", "pip", "install", "-q", str(ROOT)])
        for heavy in ("torch", "transformers", "diffusers"):
            r = subprocess.run([py, "-c", f"import {heavy}"], capture_output=True)
            if r.returncode == 0:
                print(f"FAIL: the base install pulled in {heavy}")
                return 1
        out = work / "image.png"
        run([env_dir / "bin" / "sdrt", "generate", engine, "a red circle", "-o", out, "--steps", "3", "--seed", "1",
             "--quiet"])
        from PIL import Image

        with Image.open(out) as im:
            assert im.size == (32, 32), im.size
            assert "Steps: 3" in im.info.get("parameters", ""), im.info
        run([py, "-c", "import sys, sdrt.runtime; from sdrt.runtime import Pipeline; "
                       "assert not {'torch','transformers','diffusers'} & set(sys.modules)"])
        # the service too: `pip install 'sdrt[serve]'` adds FastAPI, uvicorn and prometheus-client, no torch
        run([py, "-m", "pip", "install", "-q", f"{ROOT}[serve]"])
        run([py, "-c", "import sys, sdrt.serve.app, sdrt.serve.server, sdrt.serve.cli; "
                       "heavy = {'torch','transformers','diffusers'} & set(sys.modules); assert not heavy, heavy"])
        run([env_dir / "bin" / "sdrt", "serve", "--help"], stdout=subprocess.DEVNULL)
        print("base install: torch-free `sdrt generate` and `sdrt serve` OK")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
