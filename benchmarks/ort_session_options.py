"""ONNX Runtime session options, one at a time, on the UNet step the CPU backend runs (fused-attention graph).

    .venv/bin/python benchmarks/ort_session_options.py [--size 512] [--runs 3]

Each configuration loads its own session (in its own process) and reports the median of ``--runs`` timed
calls after one warm-up call. The baseline is sdrt's OnnxRuntimeBackend.session_options().
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from timing import time_calls

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "sdrt default": {},
    "threads=1": {"threads": 1},
    "memory pattern on": {"enable_mem_pattern": True},
    "no CPU memory arena": {"enable_cpu_mem_arena": False},
    "optimization level EXTENDED": {"level": "ORT_ENABLE_EXTENDED"},
    "denormals as zero": {"config": {"session.set_denormal_as_zero": "1"}},
    "no spinning": {"config": {"session.intra_op.allow_spinning": "0"}},
}


def child(name: str, path: str, size: int, runs: int) -> float:
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT))
    from sdrt.runtime.backends.onnxruntime import OnnxRuntimeBackend

    cfg = CONFIGS[name]
    opts = OnnxRuntimeBackend("cpu", threads=cfg.get("threads")).session_options()
    for key in ("enable_mem_pattern", "enable_cpu_mem_arena"):
        if key in cfg:
            setattr(opts, key, cfg[key])
    if "level" in cfg:
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, cfg["level"])
    for k, v in cfg.get("config", {}).items():
        opts.add_session_config_entry(k, v)
    s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    lat = size // 8
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, lat, lat), dtype=np.float32),
             "timestep": np.array([500, 500], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32)}
    return float(np.median(time_calls(lambda: s.run(None, feeds), runs)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--engine-dir", default=str(ROOT / "build/engines/sd15"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    unet = json.loads((Path(args.engine_dir) / "sdrt.json").read_text())["components"]["unet"]
    path = str(Path(args.engine_dir) / unet["variants"]["cpu"]["file"])
    if args.child:
        print(child(args.child, path, args.size, args.runs))
        return 0
    print(f"| session option ({args.size} px, UNet step, batch 2) | p50 s | vs default |\n|---|---:|---:|")
    base = None
    for name in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--runs", str(args.runs),
                              "--engine-dir", args.engine_dir, "--child", name], capture_output=True, text=True)
        t = float(out.stdout.strip().splitlines()[-1])
        base = base or t
        print(f"| {name} | {t:.2f} | {t / base:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
