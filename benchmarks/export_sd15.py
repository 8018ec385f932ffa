"""Export the full-size SD1.5 architecture (random weights) and report wall time, peak memory and parity.

    .venv/bin/python benchmarks/export_sd15.py [--model build/models/sd15] [--out build/engines/sd15]

Makes the random-weight checkpoint first if it is missing (tools/make_models.py). The export runs in a child
process so that its peak resident memory is measured on its own (getrusage RUSAGE_CHILDREN).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "build/models/sd15"))
    ap.add_argument("--out", default=str(ROOT / "build/engines/sd15"))
    args = ap.parse_args()
    model, out = Path(args.model), Path(args.out)
    if not (model / "model_index.json").is_file():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tools.make_models", "sd15", str(model)], cwd=ROOT, check=True)
        print(f"made random-weight SD1.5 checkpoint in {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sdrt", "export", str(model), str(out), "--force"], cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux
    manifest = json.loads((out / "sdrt.json").read_text())
    print(f"\nSD1.5 architecture export on {platform.machine()} ({_cpus()} CPUs)")
    print(f"wall time      {wall:8.1f} s")
    print(f"peak RSS       {peak_gib:8.2f} GiB (largest child process)")
    print(f"{'component':14s}{'rel_l2':>10s}{'max_abs':>10s}{'MB':>10s}{'s':>8s}  parity inputs")
    for name, c in manifest["components"].items():
        p = c["parity"]
        print(f"{name:14s}{p['rel_l2']:10.2e}{p['max_abs']:10.2e}{c['size_bytes'] / 1e6:10.1f}{c['export_s']:8.1f}  {p['inputs']}")
        for variant, v in c.get("variants", {}).items():
            q = v["parity"]
            what = v.get("attention") or (f"{v['groupnorms']} GroupNorm as LayerNormalization" if "groupnorms" in v else "")
            print(f"  {variant} variant {q['rel_l2']:10.2e}{q['max_abs']:10.2e}  ({v['file']}, {what})")
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
