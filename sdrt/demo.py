"""`sdrt demo` (and `make demo`): the main job on the embedded default model, end to end.

Exports the small trained model shipped in ``models/`` (tools/train_shapes.py made it), generates a few
prompts with the torch-free runtime, writes the pictures and a contact sheet, and prints export parity,
parity against diffusers (same seeds) and per-stage times.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sdrt._signals import terminate_as_interrupt
from sdrt.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "shapes-32"
DEFAULT_TINY_VAE = ROOT / "models" / "shapes-32-tiny-vae"   # its tiny VAE (tools/train_tiny_vae.py)
DEFAULT_PROMPTS = (
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a white triangle on a green background",
    "a blue circle on a yellow background",
    "a green square on a white background",
    "a black triangle on a red background",
)


def run_demo(model: Path, out: Path, steps: int, guidance: float, seed: int, scheduler: str | None,
             prompts=DEFAULT_PROMPTS, progress: bool = True, tiny_vae: Path | None = None) -> dict:
    from sdrt.export import export_model
    from sdrt.runtime import Pipeline
    from sdrt.runtime.images import contact_sheet, format_parameters, save_png
    from sdrt.runtime.schedulers import steps_phrase

    if not (model / "model_index.json").is_file():
        raise UserError(f"demo model {str(model)!r} not found (run from a checkout of sdrt, or pass --model)")
    out.mkdir(parents=True, exist_ok=True)
    engine = out / "engine"
    print(f"1/3 export {model} -> {engine}", file=sys.stderr)
    manifest = export_model(model, engine, force=True, progress=progress, log=lambda m: None, tiny_vae=tiny_vae)
    print("\nexport parity (ONNX Runtime vs PyTorch, relative L2):")
    for name, c in manifest["components"].items():
        print(f"  {name:13s} {c['parity']['rel_l2']:.2e}")
    print(f"\n2/3 generate {len(prompts)} prompts with the torch-free runtime", file=sys.stderr)
    pipe = Pipeline(engine)
    images, timings, tiny_images, tiny_ms = [], [], [], []
    for i, prompt in enumerate(prompts):
        r = pipe.generate(prompt, steps=steps, guidance=guidance, seed=seed + i, scheduler=scheduler)
        images.append(r.images[0])
        timings.append(r.timings)
        if tiny_vae is not None:  # the same latents through the tiny decoder
            t0 = time.perf_counter()
            tiny_images.append(pipe.decode_latents(r.latents, "vae_decoder_tiny")[0])
            tiny_ms.append((time.perf_counter() - t0) * 1e3)
        save_png(r.images[0], out / f"{i}.png", format_parameters(
            prompt, None, steps, scheduler or pipe.model.scheduler_class, guidance, seed + i,
            pipe.model.default_height, pipe.model.default_width, model.name))
    sheet = contact_sheet(images, labels=[p.removeprefix("a ").replace(" on a ", " on ").replace(" background", "")
                                          for p in prompts],
                          columns=3, scale=max(1, 128 // max(images[0].shape[:2])))
    save_png(sheet, out / "contact_sheet.png")
    te = sum(t["text_encoder_ms"] for t in timings) / len(timings)
    unet = sum(sum(t["unet_step_ms"]) / len(t["unet_step_ms"]) for t in timings) / len(timings)
    vae = sum(t["vae_decode_ms"] for t in timings) / len(timings)
    total = sum(t["total_s"] for t in timings) / len(timings)
    calls = len(timings[0]["unet_step_ms"])
    print(f"\nper image ({pipe.backend.describe()}): text encoder {te:.1f} ms, UNet {unet:.1f} ms per evaluation, "
          f"{steps_phrase(steps, calls)}, VAE decode {vae:.1f} ms, total {total:.2f} s")
    print(f"pictures: {out}/0.png ... {out}/{len(prompts) - 1}.png; contact sheet: {out / 'contact_sheet.png'}")
    checks = _shape_check(prompts, images)
    if tiny_images:
        print(f"\nthe tiny VAE decoder ({tiny_vae.name}): {sum(tiny_ms) / len(tiny_ms):.1f} ms per decode against "
              f"{vae:.1f} ms for the full one")
        save_png(contact_sheet(tiny_images, columns=3, scale=max(1, 128 // max(images[0].shape[:2]))),
                 out / "contact_sheet_tiny_vae.png")
        _shape_check(prompts, tiny_images)
    parity = _diffusers_parity(model, prompts, images, steps, guidance, seed, scheduler)
    return {"images": images, "timings": timings, "checks": checks, "parity": parity}


def _shape_check(prompts, images):
    try:
        sys.path.insert(0, str(ROOT))
        from tools.shape_check import classify
    except ImportError:
        return None
    print("\nwhat the pictures show (tools/shape_check.py):")
    results = []
    for p, im in zip(prompts, images):
        c = classify(im)
        words = p.split()
        want = {"object": words[1], "shape": words[2], "background": words[5]}
        ok = all(c.get(k) == v for k, v in want.items())
        results.append(ok)
        print(f"  {'ok ' if ok else 'MISS'} {p!r}: {c.get('object')} {c.get('shape')} on {c.get('background')}")
    print(f"  {sum(results)}/{len(results)} as asked")
    return results


def _diffusers_parity(model, prompts, images, steps, guidance, seed, scheduler):
    try:
        import torch  # noqa: F401
    except ImportError:
        print("\n(parity against diffusers skipped: torch is not installed)")
        return None
    from sdrt.bench.reference import diffusers_pipeline, diffusers_scheduler
    from sdrt.runtime.images import images_psnr

    print("\n3/3 parity against diffusers (same seeds)", file=sys.stderr)
    ref = diffusers_pipeline(model)
    ref.scheduler = diffusers_scheduler(scheduler, dict(ref.scheduler.config))
    psnrs = []
    t0 = time.perf_counter()
    for i, (p, im) in enumerate(zip(prompts, images)):
        out = ref(p, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(seed + i)).images[0]
        psnrs.append(images_psnr(im, (out * 255).round().astype("uint8")))
    dt = (time.perf_counter() - t0) / len(prompts)
    worst = min(psnrs)
    shown = "identical (inf)" if worst == float("inf") else f"{worst:.1f} dB"
    print(f"image PSNR sdrt vs diffusers: min {shown} over {len(psnrs)} images "
          f"(diffusers took {dt:.2f} s per image here)")
    return psnrs


@terminate_as_interrupt
def _cmd_demo(args) -> int:
    tiny = args.tiny_vae if args.tiny_vae is not None else (str(DEFAULT_TINY_VAE) if Path(args.model) == DEFAULT_MODEL
                                                            and DEFAULT_TINY_VAE.is_dir() else "")
    run_demo(Path(args.model), Path(args.out), args.steps, args.guidance, args.seed, args.scheduler,
             progress=not args.quiet, tiny_vae=Path(tiny) if tiny else None)
    return 0


def add_subcommand(sub) -> None:
    p = sub.add_parser("demo", help="export the embedded model and draw a few prompts",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--model", default=str(DEFAULT_MODEL), help=f"checkpoint (default {DEFAULT_MODEL.relative_to(ROOT)})")
    p.add_argument("--out", default="build/demo", help="where to write the engine and pictures (default build/demo)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", default=None)
    p.add_argument("--tiny-vae", default=None, metavar="DIR",
                   help=f"an AutoencoderTiny for the model, also decoding every picture (default with the default "
                        f"model: {DEFAULT_TINY_VAE.relative_to(ROOT)}; '' for none)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)
