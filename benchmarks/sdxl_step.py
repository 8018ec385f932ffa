"""One SDXL UNet step (batch 2: one guided image) and one VAE decode at 1024x1024, sdrt against diffusers.

    .venv/bin/python benchmarks/sdxl_step.py [--engine-dir build/engines/sdxl] [--model build/models/sdxl]
        [--size 1024] [--runs 2] [--threads 2] [--json FILE]

Needs `make sdxl-export` first. Four processes, one after another (each holds its own copy of the model: the
UNet is 10 GB in fp32): sdrt's UNet and VAE decoder as the CPU backend loads them for `sdrt generate`
(OnnxRuntimeBackend.load: the fused-attention UNet, the VAE with GroupNorm as LayerNormalization), and
diffusers' UNet2DConditionModel and AutoencoderKL.decode, eager fp32. The same inputs for both: a random latent,
SDXL's added conditioning (pooled text embedding, time ids of a 1024x1024 image). Each process makes one
untimed warm-up call, then ``--runs`` timed calls; it reports its load time and peak resident memory
(os.wait4's rusage), and its last output, so sdrt's is compared with diffusers' (relative L2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from profile_ops import feeds_for
from timing import time_calls

ROOT = Path(__file__).resolve().parents[1]


def child(engine: str, what: str, args) -> dict:
    manifest = json.loads((Path(args.engine_dir) / "sdrt.json").read_text())
    feeds = feeds_for(what, args.size, manifest["model"])
    t0 = time.perf_counter()
    if engine == "sdrt":
        sys.path.insert(0, str(ROOT))
        from sdrt.runtime.backends.onnxruntime import OnnxRuntimeBackend
        from sdrt.runtime.manifest import Manifest

        session = OnnxRuntimeBackend("cpu", threads=args.threads).load(Manifest.load(args.engine_dir), what)
        name = session.outputs[0].name

        def run():
            return session.run(feeds)[name]
    else:
        import torch

        torch.set_num_threads(args.threads)
        if what == "unet":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel.from_pretrained(Path(args.model) / "unet").eval()
            t = {k: torch.from_numpy(v) for k, v in feeds.items()}
            added = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}

            def call():
                return model(t["sample"], t["timestep"], t["encoder_hidden_states"], added_cond_kwargs=added,
                             return_dict=False)[0]
        else:
            from diffusers import AutoencoderKL

            model = AutoencoderKL.from_pretrained(Path(args.model) / "vae").eval()
            z = torch.from_numpy(feeds["latent_sample"])

            def call():
                return model.decode(z, return_dict=False)[0]

        def run():
            with torch.no_grad():
                return call().numpy()
    load_s = time.perf_counter() - t0
    out = {}
    times = time_calls(lambda: out.update(y=run()), args.runs)
    np.save(args.output, out["y"])
    return {"load_s": load_s, "times": times}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine-dir", default=str(ROOT / "build/engines/sdxl"))
    ap.add_argument("--model", default=str(ROOT / "build/models/sdxl"))
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--child", nargs=2, metavar=("ENGINE", "WHAT"), help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for what in ("unet", "vae_decoder"):
            outs = {}
            for engine in ("diffusers", "sdrt"):
                outs[engine] = str(Path(tmp) / f"{engine}-{what}.npy")
                cmd = [sys.executable, __file__, "--engine-dir", args.engine_dir, "--model", args.model,
                       "--size", str(args.size), "--runs", str(args.runs), "--threads", str(args.threads),
                       "--child", engine, what, "--output", outs[engine]]
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
                stdout = proc.stdout.read()
                _, status, usage = os.wait4(proc.pid, 0)
                if os.waitstatus_to_exitcode(status):
                    raise SystemExit(f"{engine} {what} failed (exit status {os.waitstatus_to_exitcode(status)})")
                r = json.loads(stdout.strip().splitlines()[-1])
                r.update(engine=engine, what=what, p50=float(np.median(r["times"])),
                         peak_rss_gib=usage.ru_maxrss / 1024**2)
                results.append(r)
                print(f"{what:12s} {engine:9s} load {r['load_s']:6.1f} s  calls "
                      f"{' '.join(f'{t:.2f}' for t in r['times'])} s  peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
            a, e = (np.load(outs[k]).astype(np.float64) for k in ("sdrt", "diffusers"))
            rel = float(np.linalg.norm(a - e) / np.linalg.norm(e))
            results[-1]["rel_l2_vs_diffusers"] = rel
            print(f"{what:12s} sdrt vs diffusers: rel L2 {rel:.2e}, sdrt/diffusers time "
                  f"{results[-1]['p50'] / results[-2]['p50']:.2f}", flush=True)
    print(f"\n| what ({args.size}x{args.size}) | engine | load s | calls s ({args.runs} after a warm-up) | p50 s | "
          "vs diffusers | peak RSS GiB |")
    print("|---|---|---:|---|---:|---:|---:|")
    for i, r in enumerate(results):
        ref = results[i - i % 2]["p50"]
        what = "UNet step, batch 2" if r["what"] == "unet" else "VAE decode, batch 1"
        print(f"| {what} | {r['engine']} | {r['load_s']:.1f} | {' '.join(f'{t:.2f}' for t in r['times'])} | "
              f"{r['p50']:.2f} | {r['p50'] / ref:.2f} | {r['peak_rss_gib']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "threads": args.threads, "results": results},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
