"""Switching LoRAs at run time on the full-size SD1.5 architecture: time and peak memory against a plain load,
and against the export the switch replaces.

    .venv/bin/python benchmarks/lora_switch.py [--model build/models/sd15] [--engine build/engines/sd15]
                                               [--scratch build/lora-switch] [--rank 32] [--export]

Steps, each heavy one in its own child process so that its peak resident memory is its own:
1. Two random kohya LoRAs of rank ``--rank`` (alpha rank/2) over what kohya's networks.lora trains: the UNet's
   transformer blocks (q/k/v/out, feed-forward, proj_in/out) and the text encoder's attention and MLP
   (tools/make_loras.py).
2. An engine directory with weight maps. An engine exported by this sdrt has them and is used as it is. One
   exported before them (no weight map, the text encoder's weights inside its graph) is brought up to date
   in ``--scratch`` without a re-export: its files are hard-linked, the text encoder's weights moved to its
   data file (onnx load/save), and the weight maps written from the checkpoint (sdrt.export.weight_map).
3. Loads, each in a fresh process: the plain Pipeline; Pipeline(loras=[A]); and a switch: Pipeline(loras=[A])
   closed, then Pipeline(loras=[B]) timed. Each reports wall time and peak RSS; the LoRA loads also how many
   bytes of initializers they patched, and one text-encoder and one small UNet call checks the patch changed
   the outputs.
4. The export time the switch replaces: the engine's manifest (sum of export_s, which does not count loading
   the checkpoint) and benchmarks/RESULTS.md's measured `sdrt export` wall time; with ``--export``, measured
   in this run instead: `sdrt export MODEL` (all components) timed in a child process into ``--scratch``, and
   that fresh engine (which has weight maps) is the one loaded in step 3, so every figure comes from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _child(*args: str) -> dict:
    """Run this script with ``args`` in a child process; its last stdout line is a JSON result."""
    r = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


# ---- children ---------------------------------------------------------------------------------------------

def child_load(engine: str, loras: list[str]) -> dict:
    import numpy as np

    from sdrt.runtime import Pipeline
    from sdrt.runtime.lora import load_loras, lora_initializers

    t0 = time.perf_counter()
    pipe = Pipeline(engine, loras=loras)
    load_s = time.perf_counter() - t0
    peak = _peak_gib()
    out = {"load_s": load_s, "peak_rss_gib": peak}
    if loras:
        t0 = time.perf_counter()
        patched = {c: lora_initializers(pipe.manifest, c, load_loras(loras)) for c in ("text_encoder", "unet")}
        out["patch_only_s"] = time.perf_counter() - t0  # the numpy part of the load: deltas added to the weights
        out["patched_initializers"] = sum(len(p) for p in patched.values())
        out["patched_mb"] = sum(v.nbytes for p in patched.values() for v in p.values()) / 1e6
        del patched
    ids = pipe.tokenizer.encode(["a photo of a cat"])
    out["text_sum"] = float(np.abs(pipe.sessions["text_encoder"].run({"input_ids": ids})["last_hidden_state"]).sum())
    m = pipe.model
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((1, m.latent_channels, 16, 16), dtype=np.float32),
             "timestep": np.array([500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, m.text_max_length, m.text_hidden_size), dtype=np.float32)}
    out["unet_sum"] = float(np.abs(pipe.sessions["unet"].run(feeds)["out_sample"]).sum())
    return out


def child_switch(engine: str, first: str, second: str) -> dict:
    from sdrt.runtime import Pipeline

    pipe = Pipeline(engine, loras=[first])
    before = _peak_gib()
    pipe.close()
    del pipe
    t0 = time.perf_counter()
    pipe = Pipeline(engine, loras=[second])
    return {"switch_s": time.perf_counter() - t0, "peak_rss_gib": _peak_gib(), "peak_before_switch_gib": before}


def child_retrofit(model: str, source: str, target: str) -> dict:
    """Hard-link ``source`` into ``target`` and add what LoRAs at run time need, without re-exporting."""
    import onnx
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdrt.export.exporter import _write_weight_map
    from sdrt.export.graphs import DATA_FILE
    from sdrt.runtime.manifest import MANIFEST_NAME, sha256_files, write_json_atomic

    t0 = time.perf_counter()
    src, dst = Path(source), Path(target)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, copy_function=os.link, ignore=shutil.ignore_patterns(MANIFEST_NAME))
    manifest = json.loads((src / MANIFEST_NAME).read_text())
    te = manifest["components"]["text_encoder"]
    if not te.get("data_file"):  # weights inside the graph: move them to the data file, as export now does
        graph = dst / te["file"]
        model_proto = onnx.load(str(graph))
        graph.unlink()  # a hard link to the source: never written through
        onnx.save_model(model_proto, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
        del model_proto
        te["data_file"] = DATA_FILE
        te["sha256"], te["size_bytes"] = sha256_files([graph, graph.parent / DATA_FILE])
    with torch.no_grad():
        for comp, cls in (("text_encoder", CLIPTextModel), ("unet", UNet2DConditionModel)):
            entry = manifest["components"][comp]
            module = cls.from_pretrained(Path(model) / comp).eval()
            graph = dst / entry["file"]
            variants = [dst / v["file"] for v in entry.get("variants", {}).values()]
            entry["weight_map"] = _write_weight_map(module, graph, variants)
            del module
    write_json_atomic(dst / MANIFEST_NAME, manifest)
    return {"retrofit_s": time.perf_counter() - t0, "peak_rss_gib": _peak_gib()}


def child_export(model: str, target: str) -> dict:
    """`sdrt export MODEL TARGET` as a user runs it; wall time and the process's peak memory."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "sdrt", "export", model, target, "--force", "-q"], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"sdrt export failed:\n{r.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    return {"export_s": time.perf_counter() - t0, "peak_rss_gib": peak}


def child_loras(model: str, out: str, rank: int) -> dict:
    from tools.make_loras import make_lora

    t0 = time.perf_counter()
    files = [str(make_lora(model, Path(out) / f"lora-{name}.safetensors", "kohya", rank=rank, alpha=rank / 2,
                           seed=seed, spread=0.05)) for name, seed in (("a", 1), ("b", 2))]
    return {"files": files, "mb": [os.path.getsize(f) / 1e6 for f in files], "make_s": time.perf_counter() - t0}


# ---- the run ----------------------------------------------------------------------------------------------

def _recorded_export_s() -> str:
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    for line in text.splitlines():
        if line.startswith("| wall time, `sdrt export`"):
            return line.split("|")[2].strip()
    return "?"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1].startswith("--child-"):
        kind, args = sys.argv[1][len("--child-"):], sys.argv[2:]
        result = {"load": lambda: child_load(args[0], args[1:]), "switch": lambda: child_switch(*args),
                  "retrofit": lambda: child_retrofit(*args), "loras": lambda: child_loras(args[0], args[1], int(args[2])),
                  "export": lambda: child_export(*args)}[kind]()
        print(json.dumps(result))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "build/models/sd15"))
    ap.add_argument("--engine", default=str(ROOT / "build/engines/sd15"))
    ap.add_argument("--scratch", default=str(ROOT / "build/lora-switch"))
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--export", action="store_true",
                    help="time `sdrt export MODEL` in this run and load that fresh engine (ignores --engine)")
    args = ap.parse_args()
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    exported = None
    if args.export:
        args.engine = str(scratch / "exported")
        exported = _child("--child-export", args.model, args.engine)
        print(f"sdrt export {args.model}: {exported['export_s']:.1f} s wall, peak {exported['peak_rss_gib']:.2f} GiB")
    manifest = json.loads((Path(args.engine) / "sdrt.json").read_text())
    engine = args.engine
    if "weight_map" not in manifest["components"]["unet"]:
        engine = str(scratch / "engine")
        r = _child("--child-retrofit", args.model, args.engine, engine)
        print(f"engine exported without weight maps: brought up to date in {engine} in {r['retrofit_s']:.1f} s "
              f"(peak {r['peak_rss_gib']:.2f} GiB; hard links, text encoder weights to its data file, weight maps)")
    loras = _child("--child-loras", args.model, str(scratch), str(args.rank))
    a, b = loras["files"]
    print(f"two kohya LoRAs of rank {args.rank} (UNet + text encoder): {loras['mb'][0]:.0f} MB each")
    plain = _child("--child-load", engine)
    with_a = _child("--child-load", engine, a)
    switch = _child("--child-switch", engine, a, b)
    export_s = sum(c.get("export_s", 0) for c in manifest["components"].values())
    print(f"\n{'':34s}{'wall s':>9s}{'peak RSS GiB':>14s}")
    print(f"{'plain Pipeline load':34s}{plain['load_s']:9.1f}{plain['peak_rss_gib']:14.2f}")
    print(f"{'Pipeline load with LoRA A':34s}{with_a['load_s']:9.1f}{with_a['peak_rss_gib']:14.2f}")
    print(f"{'  of which the numpy patch':34s}{with_a['patch_only_s']:9.1f}")
    print(f"{'switch A -> B (new Pipeline)':34s}{switch['switch_s']:9.1f}{switch['peak_rss_gib']:14.2f}")
    print(f"\ntouched weights: {with_a['patched_initializers']} initializers, {with_a['patched_mb']:.0f} MB; "
          f"peak over the plain load: {(with_a['peak_rss_gib'] - plain['peak_rss_gib']) * 1024**3 / 1e6:+.0f} MB")
    print(f"outputs changed by the LoRA: text encoder |sum| {plain['text_sum']:.1f} -> {with_a['text_sum']:.1f}, "
          f"UNet {plain['unet_sum']:.1f} -> {with_a['unet_sum']:.1f}")
    print(f"export the switch replaces: {export_s:.0f} s in this engine's manifest (sum of export_s), "
          f"{_recorded_export_s()} in benchmarks/RESULTS.md; switch = {100 * switch['switch_s'] / export_s:.1f}% "
          f"of the former")
    if exported is not None:
        print(f"measured in this run: `sdrt export` {exported['export_s']:.1f} s, switch {switch['switch_s']:.1f} s = "
              f"{100 * switch['switch_s'] / exported['export_s']:.1f}% of it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
