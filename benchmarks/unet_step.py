"""One UNet step (batch 2: guidance), the same inputs, on each CPU engine: where the time of an image goes.

    .venv/bin/python benchmarks/unet_step.py --size 512 [--threads 2] [--runs 3]

Engines, each in its own process after one warm-up call: PyTorch eager (diffusers, fp32), ONNX Runtime on the
portable graph (attention as MatMul/Softmax/MatMul), ONNX Runtime on the fused-attention variant (the CPU
backend's graph), OpenVINO on the portable graph (f32). Needs `make sd15-export` first.
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


def child(engine: str, path: str, size: int, threads: int, runs: int, hidden: int) -> list[float]:
    lat = size // 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, lat, lat), dtype=np.float32)
    t = np.array([500, 500], np.float32)
    e = rng.standard_normal((2, 77, hidden), dtype=np.float32)
    feeds = {"sample": x, "timestep": t, "encoder_hidden_states": e}
    if engine.startswith("onnxruntime"):
        import onnxruntime as ort

        sys.path.insert(0, str(ROOT))
        from sdrt.runtime.backends.onnxruntime import OnnxRuntimeBackend

        opts = OnnxRuntimeBackend("cpu", threads=threads).session_options()
        s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        run = lambda: s.run(None, feeds)  # noqa: E731
    elif engine == "openvino":
        import openvino as ov

        sys.path.insert(0, str(ROOT))
        from sdrt.runtime.backends.openvino import OpenVinoBackend

        core = ov.Core()
        m = core.compile_model(core.read_model(path), "CPU", OpenVinoBackend(threads=threads).compile_config())
        req = m.create_infer_request()
        run = lambda: req.infer(feeds)  # noqa: E731
    else:
        import torch
        from diffusers import UNet2DConditionModel

        torch.set_num_threads(threads)
        unet = UNet2DConditionModel.from_pretrained(path).eval()
        args = [torch.from_numpy(a) for a in (x, t, e)]

        def run():
            with torch.no_grad():
                unet(*args)
    return time_calls(run, runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, action="append")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--model", default=str(ROOT / "build/models/sd15"))
    ap.add_argument("--engine-dir", default=str(ROOT / "build/engines/sd15"))
    ap.add_argument("--child", nargs=3, metavar=("ENGINE", "PATH", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    hidden = json.loads((Path(args.engine_dir) / "sdrt.json").read_text())["model"]["text_hidden_size"]
    if args.child:
        engine, path, size = args.child
        print(json.dumps(child(engine, path, int(size), args.threads, args.runs, hidden)))
        return 0
    unet = json.loads((Path(args.engine_dir) / "sdrt.json").read_text())["components"]["unet"]
    engines = {
        "diffusers eager": str(Path(args.model) / "unet"),
        "onnxruntime (portable graph)": str(Path(args.engine_dir) / unet["file"]),
        "onnxruntime (fused attention; sdrt default)": str(Path(args.engine_dir) / unet["variants"]["cpu"]["file"]),
        "openvino (portable graph)": str(Path(args.engine_dir) / unet["file"]),
    }
    print(f"| size | engine | UNet step s (batch 2), {args.runs} runs | p50 | vs diffusers |")
    print("|---|---|---|---:|---:|")
    for size in args.size or [256, 512]:
        ref = None
        for name, path in engines.items():
            kind = "torch" if name.startswith("diffusers") else name.split()[0]
            out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--runs", str(args.runs),
                                  "--engine-dir", args.engine_dir, "--child", kind, path, str(size)],
                                 capture_output=True, text=True)
            if out.returncode:
                print(f"| {size} | {name} | failed: {(out.stderr.strip().splitlines() or ['?'])[-1]} | | |")
                continue
            times = json.loads(out.stdout.strip().splitlines()[-1])
            p50 = float(np.median(times))
            ref = ref or p50
            print(f"| {size} | {name} | {' '.join(f'{t:.2f}' for t in times)} | {p50:.2f} | {p50 / ref:.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
