"""What a ControlNet costs per step: the SD1.5 architecture at 512 px (random weights).

    .venv/bin/python benchmarks/controlnet_step.py [--work build/controlnet-step] [--runs 3] [--json F]

Makes the full-size SD1.5 checkpoint and a ControlNet for it (ControlNetModel.from_unet, SD1.5's conditioning
embedding) if missing, exports the UNet with two copies of that ControlNet (`sdrt export --components unet
--controlnet DIR:a --controlnet DIR:b`), and times, on the CPU backend, one guided step (batch 2, 64x64 latents,
77 tokens) four ways, interleaved run by run after a warm-up each: the plain UNet (what a request without a
ControlNet runs); unet_control fed zero residuals (what the plain path would cost if it ran that graph); one
ControlNet + unet_control; two ControlNets + unet_control. Prints the medians and the ratios to the plain UNet.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(ROOT / "build" / "controlnet-step"))
    ap.add_argument("--model", default=None, help="an SD1.5-architecture folder (default: made in --work)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from tools.make_models import make_controlnet, make_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else work / "sd15"
    if not model.exists():
        make_model("sd15", model)
    net = work / "controlnet"
    if not net.exists():
        make_controlnet(model, net)
    engine = work / "engine"
    if engine.exists() and "controlnet/a" not in json.loads((engine / "sdrt.json").read_text())["components"]:
        shutil.rmtree(engine)   # written before ControlNets were controlnet/NAME: export anew
    if not engine.exists():
        subprocess.run([sys.executable, "-m", "sdrt", "export", str(model), str(engine), "--components", "unet",
                        "--controlnet", f"{net}:a", "--controlnet", f"{net}:b", "-q"], check=True, cwd=ROOT)

    from sdrt.runtime.backends import get_backend
    from sdrt.runtime.manifest import Manifest

    manifest = Manifest(engine, json.loads((engine / "sdrt.json").read_text()))
    backend = get_backend("cpu")
    s = {c: backend.load(manifest, c) for c in ("unet", "unet_control", "controlnet/a", "controlnet/b")}
    m = manifest.model
    rng = np.random.default_rng(0)
    base = {"sample": rng.standard_normal((2, 4, 64, 64), dtype=np.float32),
            "timestep": np.full((2,), 500.0, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((2, m.text_max_length, m.text_hidden_size), dtype=np.float32)}
    image = rng.random((2, 3, 512, 512), dtype=np.float32)
    residuals = s["controlnet/a"].run({**base, "controlnet_cond": image})
    zeros = {k: np.zeros_like(v) for k, v in residuals.items()}

    def plain():
        s["unet"].run(base)

    def zero_residuals():
        s["unet_control"].run({**base, **zeros})

    def controlled(n):
        def run():
            total = None
            for c in ("controlnet/a", "controlnet/b")[:n]:
                out = s[c].run({**base, "controlnet_cond": image})
                total = out if total is None else {k: total[k] + out[k] for k in out}
            s["unet_control"].run({**base, **total})
        return run

    ways = {"plain UNet": plain, "unet_control, zero residuals": zero_residuals,
            "1 ControlNet + unet_control": controlled(1), "2 ControlNets + unet_control": controlled(2)}
    for run in ways.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.runs):
        for name, run in ways.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    p50 = {name: statistics.median(t) for name, t in times.items()}
    print(f"SD1.5 at 512 px, one guided step (batch 2), {args.runs} interleaved runs, p50:")
    for name, t in p50.items():
        print(f"  {name:32s} {t:6.2f} s  ({t / p50['plain UNet']:.3f} x the plain UNet)")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs_s": times, "p50_s": p50}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
