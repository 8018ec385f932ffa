"""Inpainting on the trained shapes model: repaint the object of "a red circle on a blue background" as a yellow one.

    .venv/bin/python benchmarks/inpaint_quality.py ENGINE [--pairs 30] [--steps 25] [--json F]

For each seed: the torch-free runtime draws the source picture (txt2img, that seed); tools/shape_check finds its
object (the blob far from the background), which, grown by --grow pixels, is the mask; the same seed then
inpaints it with the prompt "a yellow circle on a blue background" (diffusers' defaults: strength 1, no overlay).
A pair passes when the picture reads back as a yellow circle on a blue background (tools/shape_check.classify)
and the rest is unchanged: at most --share of the pixels outside the mask moved more than --tolerance of 255 (the
VAE's round trip moves every pixel a little, and the 4-channel model's mask is blended at the latent
resolution, 1/vae_scale_factor of the picture's; overlaid, as AUTOMATIC1111 answers, the outside is the source
by construction). Sources that
are not a red circle on blue are counted and left out. ENGINE: `sdrt export models/shapes-32 ENGINE`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tools.shape_check import classify, object_mask  # noqa: E402

SOURCE = "a red circle on a blue background"
TARGET = "a yellow circle on a blue background"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine_dir")
    ap.add_argument("--pairs", type=int, default=30, help="seeds whose source is as asked (default 30)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--grow", type=int, default=2, help="pixels the object's mask is grown by (default 2)")
    ap.add_argument("--tolerance", type=int, default=32, help="a pixel moved: by more than this, of 255 (default 32)")
    ap.add_argument("--share", type=float, default=0.02,
                    help="most of the outside that may move for a pass (default 0.02)")
    ap.add_argument("--max-seeds", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from sdrt.runtime import Pipeline

    pipe = Pipeline(args.engine_dir)
    rows, skipped, seed = [], 0, 0
    while len(rows) < args.pairs and seed < args.max_seeds:
        source = pipe.generate(SOURCE, seed=seed, steps=args.steps).images[0]
        seen = classify(source)
        if (seen["object"], seen["shape"], seen["background"]) != ("red", "circle", "blue"):
            skipped, seed = skipped + 1, seed + 1
            continue
        _, blob = object_mask(source)
        mask = Image.fromarray((blob * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(2 * args.grow + 1))
        outside = np.asarray(mask) == 0
        row = {"seed": seed}
        for overlay in (False, True):
            out = pipe.generate(TARGET, init_image=Image.fromarray(source), mask=mask, seed=seed, steps=args.steps,
                                overlay=overlay).images[0]
            got = classify(out)
            change = np.abs(out[outside].astype(int) - source[outside].astype(int)).max(axis=-1)
            moved = float((change > args.tolerance).mean())
            colour = (got["object"], got["shape"], got["background"]) == ("yellow", "circle", "blue")
            key = "overlay" if overlay else "plain"
            row[key] = {"read": got, "outside_moved_share": moved, "outside_max_change": int(change.max()),
                        "colour_ok": colour, "pass": colour and moved <= args.share}
        rows.append(row)
        seed += 1
    n = len(rows)
    summary = {key: {"pass_rate": sum(r[key]["pass"] for r in rows) / n,
                     "colour_rate": sum(r[key]["colour_ok"] for r in rows) / n,
                     "outside_moved_share_p50": float(np.median([r[key]["outside_moved_share"] for r in rows])),
                     "outside_moved_share_max": max(r[key]["outside_moved_share"] for r in rows),
                     "outside_max_change_p50": float(np.median([r[key]["outside_max_change"] for r in rows]))}
               for key in ("plain", "overlay")}
    print(f"{n} pairs (seeds 0-{seed - 1}; {skipped} sources were not a red circle on blue), {args.steps} steps, "
          f"mask grown {args.grow} px; a pass: a yellow circle on blue, at most {args.share:.0%} of the outside moved "
          f"by more than {args.tolerance}/255")
    for key, s in summary.items():
        print(f"  {key:8s}: pass {s['pass_rate']:.0%} (yellow circle on blue {s['colour_rate']:.0%}; outside moved: "
              f"p50 {s['outside_moved_share_p50']:.1%}, max {s['outside_moved_share_max']:.1%} of its pixels; "
              f"largest change p50 {s['outside_max_change_p50']:.0f}/255)")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "summary": summary, "pairs": rows},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
