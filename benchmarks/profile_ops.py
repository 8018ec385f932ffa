"""Where a component's time goes, by operator: ONNX Runtime's profiler or OpenVINO's performance counters.

    .venv/bin/python benchmarks/profile_ops.py --engine onnxruntime --component unet --size 512
    .venv/bin/python benchmarks/profile_ops.py --engine openvino --component vae_decoder --size 512

One process, one warm-up call, then one profiled call (batch 2 for the UNet, as with guidance; batch 1 for the
VAE decoder). ONNX Runtime runs the component's CPU variant (what the `cpu` backend loads), OpenVINO the
portable graph. Kernel times are summed per operator type (ONNX Runtime: op type after its graph
optimizations; OpenVINO: node type and the kernel it picked). Needs `make sd15-export`.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def feeds_for(component: str, size: int, model: dict) -> dict[str, np.ndarray]:
    """Random inputs of a UNet step (batch 2: one guided image; SDXL's added conditioning for a ``size`` image)
    or a VAE decode (batch 1), shaped by the manifest's model numbers."""
    rng = np.random.default_rng(0)
    lat = size // model["vae_scale_factor"]
    c = model["latent_channels"]
    if component == "unet":
        feeds = {"sample": rng.standard_normal((2, c, lat, lat), dtype=np.float32),
                 "timestep": np.array([500, 500], np.float32),
                 "encoder_hidden_states": rng.standard_normal(
                     (2, model["text_max_length"], model["text_hidden_size"]), dtype=np.float32)}
        if model.get("time_ids"):
            ids = {"original_height": size, "original_width": size, "crop_top": 0, "crop_left": 0,
                   "target_height": size, "target_width": size, "aesthetic_score": 6.0}
            feeds["text_embeds"] = rng.standard_normal((2, model["pooled_dim"]), dtype=np.float32)
            feeds["time_ids"] = np.array([[ids[k] for k in model["time_ids"]]] * 2, np.float32)
        return feeds
    return {"latent_sample": rng.standard_normal((1, c, lat, lat), dtype=np.float32)}


def profile_onnxruntime(path: Path, feeds) -> tuple[float, collections.Counter, collections.Counter]:
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT))
    from sdrt.runtime.backends.onnxruntime import OnnxRuntimeBackend

    opts = OnnxRuntimeBackend("cpu").session_options()
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        s.run(None, feeds)
        t0 = time.perf_counter()
        s.run(None, feeds)
        wall = time.perf_counter() - t0
        events = json.loads(Path(s.end_profiling()).read_text())
    last = [e for e in events if e.get("name") == "model_run"][-1]["ts"]
    us, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last:
            us[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    return wall, us, count


def profile_openvino(path: Path, feeds) -> tuple[float, collections.Counter, collections.Counter]:
    import openvino as ov

    sys.path.insert(0, str(ROOT))
    from sdrt.runtime.backends.openvino import OpenVinoBackend

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                  {**OpenVinoBackend().compile_config(), "PERF_COUNT": True})
    req = compiled.create_infer_request()
    req.infer(feeds)
    t0 = time.perf_counter()
    req.infer(feeds)
    wall = time.perf_counter() - t0
    us, count = collections.Counter(), collections.Counter()
    for p in req.profiling_info:
        key = f"{p.node_type}:{p.exec_type}"
        us[key] += p.real_time.total_seconds() * 1e6
        count[key] += 1
    return wall, us, count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=["onnxruntime", "openvino"], default="onnxruntime")
    ap.add_argument("--component", choices=["unet", "vae_decoder"], default="unet")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--engine-dir", default=str(ROOT / "build/engines/sd15"))
    args = ap.parse_args()
    engine_dir = Path(args.engine_dir)
    m = json.loads((engine_dir / "sdrt.json").read_text())
    entry = m["components"][args.component]
    feeds = feeds_for(args.component, args.size, m["model"])
    if args.engine == "onnxruntime":
        graph = engine_dir / entry.get("variants", {}).get("cpu", entry)["file"]
        wall, us, count = profile_onnxruntime(graph, feeds)
    else:
        graph = engine_dir / entry["file"]
        wall, us, count = profile_openvino(graph, feeds)
    total = sum(us.values())
    print(f"{args.engine}, {args.component} ({graph.name}), {args.size}x{args.size}: profiled call {wall:.3f} s, "
          f"kernel time {total / 1e3:.1f} ms\n")
    print("| operator | ms | share | nodes |\n|---|---:|---:|---:|")
    for op, t in us.most_common(args.top):
        print(f"| {op} | {t / 1e3:.1f} | {100 * t / total:.1f}% | {count[op]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
