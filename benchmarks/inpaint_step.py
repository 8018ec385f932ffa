"""One UNet step of a 9-channel inpainting UNet against the 4-channel one: the SD1.5 architecture at 512 px.

    .venv/bin/python benchmarks/inpaint_step.py [--work build/inpaint-step] [--runs 4] [--json F]

Makes both random-weight checkpoints with the same seed (tools/make_models.py sd15 and sd15-inpaint: they differ
only in conv_in's input channels), exports their UNets (`sdrt export --components unet`), and times one guided
step (batch 2, 64x64 latents, 77 tokens) of each on the CPU backend, the two interleaved run by run after a
warm-up call each, so that the machine's drift falls on both alike. Prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def prepare(kind: str, work: Path) -> Path:
    model, engine = work / kind, work / f"{kind}-engine"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "tools.make_models", kind, str(model)], check=True, cwd=ROOT)
    if not engine.exists():
        subprocess.run([sys.executable, "-m", "sdrt", "export", str(model), str(engine), "--components", "unet",
                        "-q"], check=True, cwd=ROOT)
    return engine


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(ROOT / "build" / "inpaint-step"))
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from sdrt.runtime.backends import get_backend
    from sdrt.runtime.manifest import Manifest

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sessions, feeds = {}, {}
    backend = get_backend("cpu")
    rng = np.random.default_rng(0)
    for kind in ("sd15", "sd15-inpaint"):
        engine = prepare(kind, work)   # the UNet alone: read its manifest as it is (Manifest.load wants them all)
        manifest = Manifest(engine, json.loads((engine / "sdrt.json").read_text()))
        m = manifest.model
        sessions[kind] = backend.load(manifest, "unet")
        channels = m.unet_in_channels or m.latent_channels
        feeds[kind] = {"sample": rng.standard_normal((2, channels, 64, 64), dtype=np.float32),
                       "timestep": np.full((2,), 500.0, dtype=np.float32),
                       "encoder_hidden_states": rng.standard_normal((2, m.text_max_length, m.text_hidden_size),
                                                                    dtype=np.float32)}
        sessions[kind].run(feeds[kind])   # warm-up
    times: dict[str, list[float]] = {kind: [] for kind in sessions}
    for _ in range(args.runs):
        for kind in sessions:
            t0 = time.perf_counter()
            sessions[kind].run(feeds[kind])
            times[kind].append(time.perf_counter() - t0)
    p50 = {kind: statistics.median(t) for kind, t in times.items()}
    ratio = p50["sd15-inpaint"] / p50["sd15"]
    print(f"SD1.5 UNet step at 512 px, batch 2 (guided), {args.runs} interleaved runs: 4-channel {p50['sd15']:.2f} s, "
          f"9-channel {p50['sd15-inpaint']:.2f} s (p50); 9/4 = {ratio:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs_s": times, "p50_s": p50, "ratio": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
