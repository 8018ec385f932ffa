"""The peers a CPU user would pick instead of sdrt, on the full-size SD1.5 architecture (random weights).

Each peer runs in its own process, one after another (never two models in memory at once), on the same
checkpoint, prompt, seed, step count and size: a load, a warm-up generation, then timed generations with
per-stage timers (text encoder, each UNet call, VAE decode) and the end-to-end time.

    .venv/bin/python benchmarks/peers.py --size 256 --size 512 [--peers sdrt,openvino,diffusers,optimum]

Peers: ``sdrt`` (default backend: ONNX Runtime CPU), ``openvino`` (sdrt's OpenVINO backend on the same ONNX),
``diffusers`` (PyTorch eager, fp32), ``optimum`` (optimum's ORTStableDiffusionPipeline on its own export; it
needs transformers < 4.58, so it runs from ``.venv-peers``: see ``--peers-python``). Peers that do not
install are reported as such. Needs ``make sd15-export`` first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPT = "a photograph of an astronaut riding a horse"


def _p(values):
    v = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90))}


class OptimumSide:
    """optimum's ORTStableDiffusionPipeline, with the same per-stage timers as sdrt's bench worker."""

    def __init__(self, path: str, threads: int | None):
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.torch = torch
        self.pipe = ORTStableDiffusionPipeline.from_pretrained(path, session_options=opts)
        self.pipe.set_progress_bar_config(disable=True)
        self.backend = f"optimum ORTStableDiffusionPipeline (onnxruntime {ort.__version__})"
        self._times: dict[str, list[float]] = {}
        for part, key in ((self.pipe.text_encoder, "text_encoder"), (self.pipe.unet, "unet"),
                          (self.pipe.vae_decoder, "vae_decode")):
            self._wrap(part, key)

    def _wrap(self, part, key):
        inner = part.forward

        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = inner(*a, **kw)
            self._times.setdefault(key, []).append((time.perf_counter() - t0) * 1e3)
            return out

        part.forward = timed

    def generate(self, s: dict, record: bool = False) -> dict:
        self._times = {}
        t0 = time.perf_counter()
        self.pipe(s["prompt"], num_inference_steps=s["steps"], guidance_scale=s["guidance"], height=s["height"],
                  width=s["width"], generator=self.torch.Generator("cpu").manual_seed(s["seed"]), output_type="np")
        total = time.perf_counter() - t0
        return {"timings": {"text_encoder_ms": sum(self._times.get("text_encoder", [])),
                            "unet_step_ms": self._times.get("unet", []),
                            "vae_decode_ms": sum(self._times.get("vae_decode", [])), "end_to_end_s": total}}


def child(args) -> int:
    """Load one peer, warm up, time; print one JSON line."""
    t0 = time.perf_counter()
    if args.peer in ("sdrt", "openvino"):
        from sdrt.bench.worker import SdrtSide

        side = SdrtSide(args.engine, "cpu" if args.peer == "sdrt" else "openvino", args.threads)
    elif args.peer == "diffusers":
        from sdrt.bench.worker import DiffusersSide

        side = DiffusersSide(args.model, "cpu", args.threads)
    else:
        side = OptimumSide(args.optimum_dir, args.threads)
    load_s = time.perf_counter() - t0
    s = {"prompt": PROMPT, "negative_prompt": "", "steps": args.steps, "guidance": 7.5, "seed": 0,
         "scheduler": None, "height": args.size, "width": args.size, "batch": 1}
    for _ in range(args.warmup):
        side.generate(s, False)
    runs = [side.generate(s, False)["timings"] for _ in range(args.runs)]
    import resource

    out = {"peer": args.peer, "backend": side.backend, "size": args.size, "load_s": load_s,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "text_encoder_ms": _p([r["text_encoder_ms"] for r in runs]),
           "unet_step_ms": _p([x for r in runs for x in r["unet_step_ms"]]),
           "vae_decode_ms": _p([r["vae_decode_ms"] for r in runs]),
           "end_to_end_s": _p([r["end_to_end_s"] for r in runs]), "steps": args.steps, "runs": args.runs}
    sys.stdout.flush()
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def ensure_optimum_export(peers_python: str, model: Path, out: Path) -> None:
    if (out / "model_index.json").is_file():
        return
    t0 = time.perf_counter()
    subprocess.run([peers_python, "-m", "optimum.exporters.onnx", "--model", str(model), "--task", "text-to-image",
                    str(out)], check=True)
    print(f"optimum export took {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--peer", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, action="append", default=None)
    ap.add_argument("--peers", default="sdrt,openvino,diffusers,optimum")
    ap.add_argument("--model", default=str(ROOT / "build/models/sd15"))
    ap.add_argument("--engine", default=str(ROOT / "build/engines/sd15"))
    ap.add_argument("--optimum-dir", default=str(ROOT / "build/optimum/sd15"))
    ap.add_argument("--peers-python", default=str(ROOT / ".venv-peers/bin/python"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="append results to this JSON file")
    args = ap.parse_args()
    if args.child:
        args.size = args.size[0]
        return child(args)
    results = []
    for size in args.size or [256, 512]:
        for peer in args.peers.split(","):
            python = sys.executable
            if peer == "optimum":
                if not Path(args.peers_python).exists():
                    print(f"{peer}: skipped ({args.peers_python} not found)")
                    continue
                python = args.peers_python
                ensure_optimum_export(python, Path(args.model), Path(args.optimum_dir))
            cmd = [python, __file__, "--child", "--peer", peer, "--size", str(size), "--model", args.model,
                   "--engine", args.engine, "--optimum-dir", args.optimum_dir, "--steps", str(args.steps),
                   "--runs", str(args.runs), "--warmup", str(args.warmup)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
            if r.returncode or line is None:
                err = (r.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{peer} @ {size}: failed ({err})", flush=True)
                continue
            res = json.loads(line[len("RESULT "):])
            results.append(res)
            print(f"{peer:10s} {size:4d}px  UNet step p50 {res['unet_step_ms']['p50']:8.0f} ms  "
                  f"VAE decode {res['vae_decode_ms']['p50']:7.0f} ms  text {res['text_encoder_ms']['p50']:5.0f} ms  "
                  f"end-to-end {res['end_to_end_s']['p50']:6.1f} s  load {res['load_s']:5.1f} s  "
                  f"peak RSS {res['peak_rss_mb']:6.0f} MB", flush=True)
    print()
    print(markdown(results))
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.is_file() else []
        env = {"cpu": _cpu(), "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d")}
        path.write_text(json.dumps(old + [{"environment": env, "results": results}], indent=1))
    return 0


def markdown(results) -> str:
    lines = ["| size | peer | backend | UNet step ms p50 | vs diffusers | VAE decode ms | text encoder ms | "
             "end-to-end s (steps) | load s | peak RSS MB |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    ref = {r["size"]: r["unet_step_ms"]["p50"] for r in results if r["peer"] == "diffusers"}
    for r in results:
        ratio = r["unet_step_ms"]["p50"] / ref[r["size"]] if r["size"] in ref else None
        lines.append(f"| {r['size']} | {r['peer']} | {r['backend']} | {r['unet_step_ms']['p50']:.0f} | "
                     f"{'—' if ratio is None else f'{ratio:.2f}'} | {r['vae_decode_ms']['p50']:.0f} | "
                     f"{r['text_encoder_ms']['p50']:.0f} | {r['end_to_end_s']['p50']:.1f} ({r['steps']}) | "
                     f"{r['load_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
