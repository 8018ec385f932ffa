"""What export_sd15.py and export_sdxl.py share: make the random-weight checkpoint if missing, export it in a
child process, and report that process's wall time, peak resident memory and parity."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_child(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` in ROOT; return (wall seconds, peak RSS in GiB) of that process alone (os.wait4's rusage)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit status {proc.returncode}")
    return wall, usage.ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux


def export_and_report(kind: str, label: str, model: Path, out: Path) -> int:
    if not (model / "model_index.json").is_file():
        wall, peak = run_child([sys.executable, "-m", "tools.make_models", kind, str(model)])
        print(f"made random-weight {label} checkpoint in {wall:.0f} s (peak RSS {peak:.2f} GiB)", flush=True)
    wall, peak = run_child([sys.executable, "-m", "sdrt", "export", str(model), str(out), "--force"])
    manifest = json.loads((out / "sdrt.json").read_text())
    print(f"\n{label} architecture export on {platform.machine()} ({len(os.sched_getaffinity(0))} CPUs)")
    print(f"wall time      {wall:8.1f} s")
    print(f"peak RSS       {peak:8.2f} GiB (the export process)")
    print(f"{'component':14s}{'rel_l2':>10s}{'max_abs':>10s}{'MB':>10s}{'s':>8s}  parity inputs")
    for name, c in manifest["components"].items():
        p = c["parity"]
        print(f"{name:14s}{p['rel_l2']:10.2e}{p['max_abs']:10.2e}{c['size_bytes'] / 1e6:10.1f}{c['export_s']:8.1f}  {p['inputs']}")
        for variant, v in c.get("variants", {}).items():
            q = v["parity"]
            what = v.get("attention") or (f"{v['groupnorms']} GroupNorm as LayerNormalization" if "groupnorms" in v else "")
            print(f"  {variant} variant {q['rel_l2']:10.2e}{q['max_abs']:10.2e}  ({v['file']}, {what})")
    return 0


def main(kind: str, label: str, doc: str) -> int:
    """The command line of export_sd15.py / export_sdxl.py (``doc``: the script's docstring)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "build/models" / kind))
    ap.add_argument("--out", default=str(ROOT / "build/engines" / kind))
    args = ap.parse_args()
    return export_and_report(kind, label, Path(args.model), Path(args.out))
