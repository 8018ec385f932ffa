"""How cost grows: `sdrt bench` (sdrt and diffusers side by side) over resolution and over batch, plotted.

    .venv/bin/python benchmarks/scaling.py [--sizes 256,512,768] [--batches 1,2,4] [--batch-size 256]

Resolution runs at batch 1; batch runs at --batch-size px. Writes benchmarks/results/scaling.json and
benchmarks/results/scaling.png. Needs `make sd15-export` first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(engine: str, model: str, size: int, batch: int, steps: int, runs: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "b.json"
        subprocess.run([sys.executable, "-m", "sdrt", "bench", engine, "--reference", model, "--height", str(size),
                        "--width", str(size), "--batch", str(batch), "--steps", str(steps), "--runs", str(runs),
                        "--warmup", str(warmup), "--json", str(out), "-q"], cwd=ROOT, check=True)
        return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default=str(ROOT / "build/engines/sd15"))
    ap.add_argument("--model", default=str(ROOT / "build/models/sd15"))
    ap.add_argument("--sizes", default="256,512,768")
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--batch-size", type=int, default=256, help="resolution of the batch sweep")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    configs = [(int(s), 1) for s in args.sizes.split(",")]
    configs += [(args.batch_size, int(b)) for b in args.batches.split(",") if (args.batch_size, int(b)) not in configs]
    for size, batch in configs:
        r = bench(args.engine, args.model, size, batch, args.steps, args.runs, args.warmup)
        sd, ref = r["runs"]
        row = {"size": size, "batch": batch,
               "sdrt_unet_step_ms": sd["unet_step_ms"]["p50"], "diffusers_unet_step_ms": ref["unet_step_ms"]["p50"],
               "sdrt_vae_decode_ms": sd["vae_decode_ms"]["p50"], "diffusers_vae_decode_ms": ref["vae_decode_ms"]["p50"],
               "sdrt_end_to_end_s": sd["end_to_end_s"]["p50"], "diffusers_end_to_end_s": ref["end_to_end_s"]["p50"],
               "ratio_unet_step": r["ratio"]["unet_step"], "ratio_end_to_end": r["ratio"]["end_to_end"],
               "image_psnr_db": r["parity"]["image_psnr_db"], "environment": r["environment"]}
        rows.append(row)
        print(f"{size:4d}px batch {batch}: UNet step sdrt {row['sdrt_unet_step_ms']:8.0f} ms, diffusers "
              f"{row['diffusers_unet_step_ms']:8.0f} ms (ratio {row['ratio_unet_step']:.2f}); VAE decode "
              f"{row['sdrt_vae_decode_ms']:7.0f} / {row['diffusers_vae_decode_ms']:7.0f} ms; PSNR "
              f"{'identical' if row['image_psnr_db'] is None else format(row['image_psnr_db'], '.1f') + ' dB'}", flush=True)
    (out / "scaling.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "scaling.png", args.batch_size)
    print(f"wrote {out / 'scaling.json'} and {out / 'scaling.png'}")
    return 0


def plot(rows, path: Path, batch_size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    res = [r for r in rows if r["batch"] == 1]
    for key, label in (("sdrt_unet_step_ms", "sdrt UNet step"), ("diffusers_unet_step_ms", "diffusers UNet step"),
                       ("sdrt_vae_decode_ms", "sdrt VAE decode"), ("diffusers_vae_decode_ms", "diffusers VAE decode")):
        a.plot([r["size"] for r in res], [r[key] / 1e3 for r in res], marker="o", label=label)
        bat = [r for r in rows if r["size"] == batch_size]
        b.plot([r["batch"] for r in bat], [r[key] / 1e3 for r in bat], marker="o", label=label)
    a.set_xlabel("image size (px, square), batch 1")
    b.set_xlabel(f"images per call at {batch_size} px (UNet batch x2 for guidance)")
    for ax in (a, b):
        ax.set_ylabel("seconds (p50)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("SD1.5 architecture, CPU: cost against resolution and batch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
