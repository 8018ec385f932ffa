"""ONNX Runtime's memory pattern on and off: time, page faults and peak memory of the first calls of a session.

    .venv/bin/python benchmarks/ort_memory_pattern.py [--size 512] [--calls 5] [--rounds 2]

Each configuration (component x pattern on/off) runs in its own process: the component's CPU graph with sdrt's
session options, except ``enable_mem_pattern``; ``--calls`` calls on the same inputs (batch 2 for the UNet,
batch 1 for the VAE decoder), each with its wall time and the minor page faults it caused, then the process's
peak RSS. Needs `make sd15-export`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(component: str, size: int, pattern: bool, calls: int, engine_dir: str) -> dict:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from profile_ops import feeds_for

    from sdrt.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from sdrt.runtime.manifest import Manifest

    class Backend(OnnxRuntimeBackend):
        def session_options(self):
            opts = super().session_options()
            opts.enable_mem_pattern = pattern
            return opts

    manifest = Manifest.load(engine_dir)
    session = Backend("cpu").load(manifest, component)
    feeds = feeds_for(component, size, manifest.data["model"])
    times, faults = [], []
    for _ in range(calls):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        session.run(feeds)
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"times": times, "faults": faults, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--engine-dir", default=str(ROOT / "build/engines/sd15"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        comp, pattern = args.child
        print(json.dumps(child(comp, args.size, pattern == "on", args.calls, args.engine_dir)))
        return 0
    print(f"{args.size}x{args.size}, {args.calls} calls per process; time s and minor page faults per call\n")
    print("| component | memory pattern | round | call times s | page faults per call | peak RSS MB |")
    print("|---|---|---:|---|---|---:|")
    for rnd in range(1, args.rounds + 1):
        for comp in ("vae_decoder", "unet"):
            for pattern in ("on", "off"):
                out = subprocess.run([sys.executable, __file__, "--child", comp, pattern, "--size", str(args.size),
                                      "--calls", str(args.calls), "--engine-dir", args.engine_dir],
                                     capture_output=True, text=True, cwd=ROOT)
                if out.returncode:
                    raise SystemExit(out.stderr[-2000:])
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {comp} | {pattern} | {rnd} | {' '.join(f'{t:.2f}' for t in r['times'])} | "
                      f"{' '.join(str(f) for f in r['faults'])} | {r['peak_rss_mb']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
