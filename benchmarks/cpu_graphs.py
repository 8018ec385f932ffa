"""The graph forms of sdrt/export/rewrites.py, each timed against the form it replaces on ONNX Runtime's CPU provider.

    .venv/bin/python benchmarks/cpu_graphs.py [--size 256 --size 512] [--runs 3] [--rounds 2]
                                              [--before build/engines/sd15-before]

1. GroupNorm: the VAE decoder of an engine directory as the portable graph (InstanceNormalization + Mul + Add)
   and as the CPU variant (one LayerNormalization), with OpenVINO on the portable graph beside them.
2. GEGLU: the SD1.5 UNet's feed-forward block (LayerNorm -> GEGLU -> Linear) at each level's token count,
   exported with the projection chunked (as diffusers writes it) and split in two (as sdrt exports it).
3. With ``--before DIR`` (an engine directory exported before these rewrites): one UNet step (batch 2) of the
   CPU graph of each engine directory.

Each configuration runs in its own process (one warm-up call, then ``--runs`` timed calls); configurations
alternate for ``--rounds`` rounds and the table gives the median over all timed calls. Needs `make sd15-export`.
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from timing import time_calls

ROOT = Path(__file__).resolve().parents[1]


def _session_run(engine: str, path: str, feeds: dict):
    sys.path.insert(0, str(ROOT))
    if engine == "openvino":
        import openvino as ov

        from sdrt.runtime.backends.openvino import OpenVinoBackend

        core = ov.Core()
        compiled = core.compile_model(core.read_model(path), "CPU", OpenVinoBackend().compile_config())
        req = compiled.create_infer_request()
        return lambda: req.infer(feeds)
    import onnxruntime as ort

    from sdrt.runtime.backends.onnxruntime import OnnxRuntimeBackend

    s = ort.InferenceSession(path, OnnxRuntimeBackend("cpu").session_options(), providers=["CPUExecutionProvider"])
    return lambda: s.run(None, feeds)


def child(engine: str, path: str, shapes: dict, runs: int) -> list[float]:
    rng = np.random.default_rng(0)
    feeds = {}
    for name, shape in shapes.items():
        feeds[name] = (np.full(shape, 500, np.float32) if name == "timestep"
                       else rng.standard_normal(shape, dtype=np.float32))
    return time_calls(_session_run(engine, path, feeds), runs)


def measure(configs: list[tuple[str, str, str, dict]], runs: int, rounds: int) -> dict[str, list[float]]:
    """configs: (label, engine, graph path, input shapes); alternated over rounds, one process each."""
    out: dict[str, list[float]] = {label: [] for label, *_ in configs}
    for _ in range(rounds):
        for label, engine, path, shapes in configs:
            res = subprocess.run([sys.executable, __file__, "--child", engine, path, json.dumps(shapes), str(runs)],
                                 capture_output=True, text=True, cwd=ROOT)
            if res.returncode:
                raise SystemExit(f"{label}: child failed\n{res.stderr[-2000:]}")
            out[label] += json.loads(res.stdout.strip().splitlines()[-1])
    return out


def export_feed_forward(tmp: Path) -> dict[str, str]:
    """SD1.5's feed-forward block (dim 320/640/1280, GEGLU to 4x), chunked and split, as ONNX files."""
    import torch
    from diffusers.models.attention import FeedForward

    sys.path.insert(0, str(ROOT))
    from sdrt.export.rewrites import split_geglu

    paths = {}
    for dim in (320, 640, 1280):
        torch.manual_seed(0)
        ff = torch.nn.Sequential(torch.nn.LayerNorm(dim), FeedForward(dim, activation_fn="geglu")).eval()
        for form in ("chunked", "split"):
            path = tmp / f"ff{dim}_{form}.onnx"
            with torch.no_grad(), split_geglu(ff) if form == "split" else nullcontext():
                torch.onnx.export(ff, (torch.randn(2, 77, dim),), str(path), dynamo=False, opset_version=17,
                                  input_names=["x"], output_names=["y"], dynamic_axes={"x": {1: "tokens"}})
            paths[f"{dim}_{form}"] = str(path)
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, action="append")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--engine-dir", default=str(ROOT / "build/engines/sd15"))
    ap.add_argument("--before", default=None, help="an engine directory exported without these rewrites")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        engine, path, shapes, runs = args.child
        print(json.dumps(child(engine, path, json.loads(shapes), int(runs))))
        return 0
    sizes = args.size or [256, 512]
    engine_dir = Path(args.engine_dir)
    m = json.loads((engine_dir / "sdrt.json").read_text())
    factor, channels = m["model"]["vae_scale_factor"], m["model"]["latent_channels"]
    dec = m["components"]["vae_decoder"]
    p50 = lambda ts: float(np.median(ts))  # noqa: E731

    print(f"sdrt CPU graph forms, {args.rounds} rounds x {args.runs} calls per configuration "
          f"(median over all), one process each\n")
    print("| what | size | form | median s | vs replaced form |\n|---|---|---|---:|---:|")
    for size in sizes:
        shapes = {"latent_sample": [1, channels, size // factor, size // factor]}
        cfg = [("InstanceNormalization (portable)", "onnxruntime", str(engine_dir / dec["file"]), shapes),
               ("LayerNormalization (cpu variant)", "onnxruntime", str(engine_dir / dec["variants"]["cpu"]["file"]),
                shapes),
               ("openvino, portable graph", "openvino", str(engine_dir / dec["file"]), shapes)]
        res = measure(cfg, args.runs, args.rounds)
        base = p50(res[cfg[0][0]])
        for label, *_ in cfg:
            print(f"| VAE decode, GroupNorm | {size} | {label} | {p50(res[label]):.3f} | "
                  f"{p50(res[label]) / base:.3f} |", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        ff = export_feed_forward(Path(tmp))
        for size in sizes:
            tokens = {320: (size // 8) ** 2, 640: (size // 16) ** 2, 1280: (size // 32) ** 2}
            for dim, n in tokens.items():
                cfg = [(f"{form}", "onnxruntime", ff[f"{dim}_{form}"], {"x": [2, n, dim]})
                       for form in ("chunked", "split")]
                res = measure(cfg, args.runs * 3, args.rounds)
                base = p50(res["chunked"])
                for label, *_ in cfg:
                    print(f"| UNet feed-forward (dim {dim}, {n} tokens, batch 2) | {size} | GEGLU {label} | "
                          f"{p50(res[label]):.4f} | {p50(res[label]) / base:.3f} |", flush=True)

    if args.before:
        before = Path(args.before)
        mb = json.loads((before / "sdrt.json").read_text())
        hidden = m["model"]["text_hidden_size"]
        for size in sizes:
            lat = size // factor
            shapes = {"sample": [2, channels, lat, lat], "timestep": [2], "encoder_hidden_states": [2, 77, hidden]}
            cfg = [("before (chunked GEGLU)", "onnxruntime", str(before / mb["components"]["unet"]["variants"]["cpu"]["file"]), shapes),
                   ("sdrt (split GEGLU)", "onnxruntime", str(engine_dir / m["components"]["unet"]["variants"]["cpu"]["file"]), shapes)]
            res = measure(cfg, args.runs, args.rounds)
            base = p50(res[cfg[0][0]])
            for label, *_ in cfg:
                print(f"| UNet step, batch 2 (fused-attention graph) | {size} | {label} | {p50(res[label]):.3f} | "
                      f"{p50(res[label]) / base:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
