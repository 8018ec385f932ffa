"""What each CPU fast mode costs, against fp32 with the same seeds (issue 17), and what it gains.

    python benchmarks/quality.py shapes [--seeds 0 1] [--branch 0]      # models/shapes-32: shape_check pass rates
    python benchmarks/quality.py sd15 [--size 256] [--steps 25]           # SD1.5 architecture, random weights
    python benchmarks/quality.py speed [--size 512] [--steps 25]          # `sdrt generate` end to end, per mode

Modes: fp32; feature caching every N UNet evaluations (cacheN); the tiny VAE decoder (tiny-vae); bf16, which
this machine cannot run (no AVX512_BF16 or AMX), measured as an *emulation* on ONNX Runtime (benchmarks/
mode_engines.py: operands of every MatMul/Conv/Gemm rounded to bf16, fp32 accumulation; accuracy only, and a
lower bound of OpenVINO bf16's error); and their combinations. Per mode: image PSNR and the latent's relative
L2 after every UNet evaluation, against fp32; per component: relative L2 against the fp32 component on the same
inputs; on shapes-32, the fraction of pictures tools/shape_check.py reads as asked. JSON goes to --out.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.mode_engines import merge  # noqa: E402
from sdrt.runtime.images import images_psnr  # noqa: E402

BUILD = ROOT / "build" / "quality"
SD15_ENGINE = Path("/work/main/build/engines/sd15")
BF16 = ("text_encoder", "unet", "unet_deep", "unet_shallow")   # what bf16 mode runs in bf16 (VAE stays fp32)
# (precision, cache interval): one denoising run each; every run is decoded by both VAE decoders
RUNS = (("fp32", None), ("fp32", 2), ("fp32", 3), ("fp32", 5), ("bf16-emulated", None), ("bf16-emulated", 3))


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def mode_label(precision: str, cache, vae: str) -> str:
    return precision + (f"+cache{cache}" if cache else "") + ("+tiny-vae" if vae == "tiny" else "")


def engines(base: Path, extra: list[Path], tag: str) -> dict[str, Path]:
    """fp32 (base + extras merged), bf16-emulated (BF16 components rewritten), and bf16-vae (only the VAE
    decoder rewritten: its component figure)."""
    return {"fp32": merge(BUILD / f"{tag}-fp32", [base, *extra]),
            "bf16-emulated": merge(BUILD / f"{tag}-bf16", [base, *extra], bf16=BF16),
            "bf16-vae": merge(BUILD / f"{tag}-bf16-vae", [base, *extra], bf16=("vae_decoder",))}


def run_modes(dirs: dict, prompts_by_run: list[tuple[list[str], int]], settings: dict, only=None) -> dict:
    """Every RUNS entry (or those ``only`` names) over the same (prompts, seed) batches: per-step latents, final
    images by both decoders."""
    from sdrt.runtime import Pipeline

    out = {}
    for precision, cache in RUNS:
        if only and mode_label(precision, cache, "full") not in only and (precision, cache) != ("fp32", None):
            continue
        pipe = Pipeline(dirs[precision], cache_interval=cache, verify="none")
        lat, full, tiny, secs = [], [], [], 0.0
        for prompts, seed in prompts_by_run:
            steps: list = []
            t0 = time.perf_counter()
            r = pipe.generate(prompts, seed=seed, callback=lambda s: steps.append(s.latents.copy()), **settings)
            secs += time.perf_counter() - t0
            lat.append(np.stack(steps))                    # [evaluations, n, C, h, w]
            full += r.images
            tiny += list(pipe.decode_latents(r.latents, "vae_decoder_tiny"))
        pipe.close()
        out[(precision, cache)] = {"latents": lat, "full": full, "tiny": tiny, "seconds": secs}
        print(f"  {mode_label(precision, cache, 'full')}: {secs:.1f} s", file=sys.stderr)
    return out


def compare(runs: dict, scorer=None, prompts=None) -> list[dict]:
    """Each mode (each run, by each decoder) against fp32 with the full decoder."""
    ref = runs[("fp32", None)]
    rows = []
    for (precision, cache), r in runs.items():
        for vae in ("full", "tiny"):
            images = r[vae]
            psnr = [images_psnr(a, b) for a, b in zip(images, ref["full"])]
            per_step = np.mean([[rel_l2(a[k], b[k]) for k in range(len(a))]
                                for a, b in zip(r["latents"], ref["latents"])], axis=0)
            row = {"mode": mode_label(precision, cache, vae), "emulated": precision != "fp32",
                   "image_psnr_db_mean": _finite_mean(psnr), "image_psnr_db_min": float(min(psnr)),
                   "images_identical": int(sum(not np.isfinite(p) for p in psnr)),
                   "latent_rel_l2_final": float(per_step[-1]), "latent_rel_l2_per_step": [float(x) for x in per_step],
                   "denoise_s": r["seconds"]}
            if scorer is not None:
                row.update(scorer(prompts, images))
            rows.append(row)
    return rows


def _finite_mean(values) -> float | None:
    v = [x for x in values if np.isfinite(x)]
    return float(np.mean(v)) if v else None


def components(dirs: dict, prompt: str, settings: dict, seed: int) -> dict:
    """Relative L2 of each component in each mode against its fp32 self, on the inputs fp32 sees."""
    from sdrt.runtime import Pipeline

    fp32 = Pipeline(dirs["fp32"], cache_interval=1, verify="none")
    req = fp32.request(prompt, seed=seed, **settings)
    loop = fp32.start(req)
    fc = fp32.feature_cache
    deep, shallow = fp32.sessions[fc["deep"]], fp32.sessions[fc["shallow"]]
    inputs, outs, feats = [], [], []
    while not loop.done:                                  # the fp32 trajectory, through the deep UNet
        x = loop.unet_inputs()
        o = deep.run(x)
        inputs.append(x), outs.append(o["out_sample"]), feats.append(o[fc["feature"]])
        loop.advance(o["out_sample"])
    stale = {}
    for k in (k for k in (1, 2, 4) if k < len(inputs)):  # a shallow step on a feature k evaluations old
        errs = [rel_l2(shallow.run({**inputs[t], fc["feature"]: feats[t - k]})["out_sample"], outs[t])
                for t in range(k, len(inputs))]
        stale[f"feature_{k}_old"] = {"mean": float(np.mean(errs)), "max": float(np.max(errs))}
    ids = fp32.prepare_prompts(req).ids
    text32 = fp32.run_text_encoder(ids)
    full = fp32.vae_decode(loop.latents)
    tiny = fp32.vae_decode(loop.latents, "vae_decoder_tiny")
    result = {"unet_shallow_vs_deep": stale,
              "vae_decoder_tiny_vs_full": {"rel_l2": rel_l2(tiny, full)}}
    fp32.close()
    bf = Pipeline(dirs["bf16-emulated"], cache_interval=1, verify="none")
    bf_deep = bf.sessions[fc["deep"]]
    result["bf16_emulated"] = {
        "text_encoder": rel_l2(bf.run_text_encoder(ids), text32),
        "unet_first_step": rel_l2(bf_deep.run(inputs[0])["out_sample"], outs[0]),
        "unet_middle_step": rel_l2(bf_deep.run(inputs[len(inputs) // 2])["out_sample"], outs[len(inputs) // 2]),
        "unet_shallow": rel_l2(bf.sessions[fc["shallow"]].run({**inputs[1], fc["feature"]: feats[0]})["out_sample"],
                               shallow.run({**inputs[1], fc["feature"]: feats[0]})["out_sample"]),
    }
    bf.close()
    vae = Pipeline(dirs["bf16-vae"], verify="none")
    result["bf16_emulated"]["vae_decoder"] = rel_l2(vae.vae_decode(loop.latents), full)
    vae.close()
    return result


def cmd_shapes(args) -> dict:
    from sdrt.export import export_model
    from tools.shape_check import all_prompts, score_details

    engine = BUILD / f"shapes-branch{args.branch}"
    if not (engine / "sdrt.json").is_file():
        export_model(ROOT / "models" / "shapes-32", engine, force=True, progress=False, log=lambda m: None,
                     cache_branch=args.branch, tiny_vae=args.tiny_vae)
    dirs = engines(engine, [], f"shapes-b{args.branch}")
    prompts = all_prompts()
    settings = dict(steps=args.steps, guidance=args.guidance)
    runs = run_modes(dirs, [(prompts, s) for s in args.seeds], settings, args.runs)

    def scorer(ps, images):
        d = score_details(ps, images)
        return {k: d[k] for k in ("accuracy", "background_accuracy", "object_accuracy", "shape_accuracy", "n")}

    rows = compare(runs, scorer, prompts * len(args.seeds))
    base = next(r for r in rows if r["mode"] == "fp32")["accuracy"]
    for r in rows:
        r["points_below_fp32"] = round(100 * (base - r["accuracy"]), 1)
        r["offered_as_is"] = r["points_below_fp32"] <= 5
    return {"model": "models/shapes-32", "branch": args.branch, "seeds": args.seeds, "pairs": len(prompts) * len(args.seeds),
            "settings": settings, "modes": rows,
            "components": components(dirs, prompts[0], dict(settings, scheduler=None), args.seeds[0])}


def cmd_sd15(args) -> dict:
    dirs = engines(SD15_ENGINE, [ROOT / "build" / "sd15-pair", ROOT / "build" / "sd15-tiny"], "sd15")
    settings = dict(steps=args.steps, guidance=args.guidance, height=args.size, width=args.size)
    batches = [([p], s) for p, s in zip(args.prompts, args.seeds)]
    rows = compare(run_modes(dirs, batches, settings, args.runs))
    return {"model": "SD1.5 architecture, random weights", "settings": settings, "prompts": args.prompts,
            "seeds": args.seeds, "modes": rows,
            "components": components(dirs, args.prompts[0], settings, args.seeds[0])}


STATS = re.compile(r"UNet ([\d.]+) s .* VAE decode (\d+) ms, total ([\d.]+) s; mode (\S+)")


def cmd_speed(args) -> dict:
    """`sdrt generate` in a fresh process per mode, loading included, one after another in this one run."""
    engine = merge(BUILD / "sd15-speed", [SD15_ENGINE, ROOT / "build" / "sd15-pair", ROOT / "build" / "sd15-tiny"])
    modes = [[], ["--cache-interval", "2"], ["--cache-interval", "3"], ["--cache-interval", "5"], ["--vae", "tiny"],
             ["--cache-interval", "3", "--vae", "tiny"]]
    rows = []
    for extra in modes:
        cmd = [sys.executable, "-m", "sdrt", "generate", str(engine), args.prompts[0], "-o", str(BUILD / "speed.png"),
               "--steps", str(args.steps), "--guidance", str(args.guidance), "--height", str(args.size),
               "--width", str(args.size), "--seed", "0", "-q", *extra]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        wall = time.perf_counter() - t0
        if r.returncode:
            raise SystemExit(r.stderr)
        m = STATS.search(r.stderr)
        rows.append({"mode": m.group(4), "wall_s": wall, "pipeline_total_s": float(m.group(3)),
                     "unet_s": float(m.group(1)), "vae_decode_ms": float(m.group(2)), "command": " ".join(cmd[2:])})
        print(f"  {rows[-1]['mode']}: {wall:.1f} s", file=sys.stderr)
    for r in rows:
        r["wall_ratio_to_fp32"] = r["wall_s"] / rows[0]["wall_s"]
        r["unet_ratio_to_fp32"] = r["unet_s"] / rows[0]["unet_s"]
    return {"settings": {"size": args.size, "steps": args.steps, "guidance": args.guidance}, "runs": rows}


def _db(x) -> str:
    return "identical" if x is None else f"{x:.1f}"


def _psnr_mean_min(r: dict) -> str:
    """A row's image PSNR against fp32, mean / min (a min of 1e9 or more: identical pictures)."""
    low = r["image_psnr_db_min"]
    return f"{_db(r['image_psnr_db_mean'])} / {_db(low if low < 1e9 else None)}"


def report(results: Path) -> str:
    """RESULTS.md's tables from the JSON files this script wrote into ``results``."""
    out = []
    shapes = _load(results / "quality_shapes.json")
    if shapes:
        out += [f"models/shapes-32, {shapes['pairs']} prompt/seed pairs (90 prompts x seeds {shapes['seeds']}), "
                f"{shapes['settings']['steps']} steps, guidance {shapes['settings']['guidance']}, DDIM; caching at "
                f"branch {shapes['branch']}:", "",
                "| mode | pictures as asked | points below fp32 | background / object / shape | image PSNR vs fp32 "
                "dB, mean / min | final latent rel L2 | denoise s (this machine, shared) | offered |",
                "|---|---:|---:|---|---:|---:|---:|---|"]
        for r in shapes["modes"]:
            out.append(f"| {r['mode']} | {r['accuracy']:.3f} | {r['points_below_fp32']:.1f} | "
                       f"{r['background_accuracy']:.3f} / {r['object_accuracy']:.3f} / {r['shape_accuracy']:.3f} | "
                       f"{_psnr_mean_min(r)} | "
                       f"{r['latent_rel_l2_final']:.4f} | {r['denoise_s']:.0f} | {'yes' if r['offered_as_is'] else 'no'} |")
        out += ["", _components(shapes["components"])]
    sd15 = _load(results / "quality_sd15_256.json")
    if sd15:
        st = sd15["settings"]
        out += ["", f"SD1.5 architecture (random weights), {st['height']}x{st['width']}, {st['steps']} steps (PNDM), "
                f"guidance {st['guidance']}, {len(sd15['seeds'])} prompt/seed pairs:", "",
                "| mode | image PSNR vs fp32 dB, mean / min | latent rel L2 after UNet evaluation 1 / middle / last |",
                "|---|---:|---:|"]
        for r in sd15["modes"]:
            e = r["latent_rel_l2_per_step"]
            out.append(f"| {r['mode']} | {_psnr_mean_min(r)} | "
                       f"{e[0]:.2e} / {e[len(e) // 2]:.2e} / {e[-1]:.2e} |")
        out += ["", _components(sd15["components"])]
    speed = _load(results / "quality_speed_sd15_512.json")
    if speed:
        st = speed["settings"]
        out += ["", f"Speed, SD1.5 architecture, {st['size']}x{st['size']}, {st['steps']} steps with guidance "
                f"{st['guidance']}, `sdrt generate` in a fresh process per mode (loading included), one run:", "",
                "| mode | end to end s | vs fp32 | UNet s (all evaluations) | vs fp32 | VAE decode ms |",
                "|---|---:|---:|---:|---:|---:|"]
        for r in speed["runs"]:
            out.append(f"| {r['mode']} | {r['wall_s']:.1f} | {r['wall_ratio_to_fp32']:.3f} | {r['unet_s']:.1f} | "
                       f"{r['unet_ratio_to_fp32']:.3f} | {r['vae_decode_ms']:.0f} |")
    return "\n".join(out) + "\n"


def _components(c: dict) -> str:
    stale = ", ".join(f"{k.split('_')[1]} evaluation{'s' if k.split('_')[1] != '1' else ''} old: mean {v['mean']:.3f}, "
                      f"max {v['max']:.3f}" for k, v in c["unet_shallow_vs_deep"].items())
    bf = c["bf16_emulated"]
    return (f"Per component, relative L2 against fp32 on the same inputs: the shallow UNet on a cached feature "
            f"against the deep UNet ({stale}); the tiny VAE decoder against the full one "
            f"{c['vae_decoder_tiny_vs_full']['rel_l2']:.3f}; bf16 (emulated) text encoder {bf['text_encoder']:.2e}, "
            f"UNet {bf['unet_first_step']:.2e} (first step) / {bf['unet_middle_step']:.2e} (middle), shallow UNet "
            f"{bf['unet_shallow']:.2e}, VAE decoder {bf['vae_decoder']:.2e}.")


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    for name, steps, size in (("shapes", 25, None), ("sd15", 25, 256), ("speed", 25, 512)):
        p = sub.add_parser(name)
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--guidance", type=float, default=7.5)
        p.add_argument("--out", required=True)
        if size:
            p.add_argument("--size", type=int, default=size)
            p.add_argument("--prompts", nargs="+", default=["a photograph of an astronaut riding a horse",
                                                            "a red fox in a snowy forest at dawn"])
        # SD1.5 at 25 steps is slow here: one prompt/seed pair unless asked for more
        p.add_argument("--seeds", type=int, nargs="+", default=[0] if name == "sd15" else [0, 1])
        p.add_argument("--runs", nargs="+", default=None, metavar="MODE",
                       help="only these denoising runs (fp32 always): " + ", ".join(mode_label(p_, c, "full")
                                                                                   for p_, c in RUNS))
        if name == "shapes":
            p.add_argument("--branch", type=int, default=0)
            p.add_argument("--tiny-vae", default=str(ROOT / "models" / "shapes-32-tiny-vae"))
    rep_ = sub.add_parser("report", help="print RESULTS.md's tables from the JSON files")
    rep_.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.what == "report":
        print(report(Path(args.results)), end="")
        return 0
    BUILD.mkdir(parents=True, exist_ok=True)
    result = {"shapes": cmd_shapes, "sd15": cmd_sd15, "speed": cmd_speed}[args.what](args)
    result["command"] = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    Path(args.out).write_text(json.dumps(result, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
