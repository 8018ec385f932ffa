"""`sdrt generate`: txt2img and img2img from the command line (torch-free)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sdrt.errors import UserError


def _out_paths(out: str, n: int) -> list[Path]:
    """``-o x.png`` with n > 1 writes x-0.png ... x-{n-1}.png."""
    p = Path(out)
    if p.suffix.lower() != ".png":
        raise UserError(f"-o {out!r}: output must be a .png file")
    if n == 1:
        return [p]
    return [p.with_name(f"{p.stem}-{i}{p.suffix}") for i in range(n)]


def _cmd_generate(args) -> int:
    from tqdm import tqdm

    from sdrt.runtime.images import format_parameters, load_init_image, save_gif, save_png
    from sdrt.runtime.pipeline import Pipeline
    from sdrt.runtime.schedulers import scheduler_name_for_config

    if args.preview and not args.preview.lower().endswith(".gif"):
        raise UserError(f"--preview {args.preview!r}: must be a .gif file")
    _out_paths(args.output, 1)  # refuse a bad -o before loading anything
    for target in filter(None, (args.output, args.preview)):
        parent = Path(target).resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise UserError(f"{target!r}: cannot write into {str(parent)!r}")
    pipe = Pipeline(args.engine_dir, backend=args.backend, loras=args.lora)
    init, height, width = None, args.height, args.width
    if args.init_image:
        # --height/--width resize the init image; the image then defines the size
        for what, v in (("height", height), ("width", width)):
            if v is not None and (v <= 0 or v % pipe.model.size_multiple):
                raise UserError(f"{what} {v}: must be a positive multiple of {pipe.model.size_multiple} for this model")
        init = load_init_image(args.init_image, pipe.model.vae_scale_factor, height, width)
        height = width = None
    req = pipe.request(args.prompt, args.negative_prompt, steps=args.steps, guidance=args.guidance,
                       seed=args.seed, scheduler=args.scheduler, height=height, width=width,
                       num_images=args.num_images, init_image=init, strength=args.strength)
    outs = _out_paths(args.output, req.batch)
    frames: list = []
    every = max(1, req.steps // 12)
    bar = tqdm(total=None, desc="denoise", unit="step", file=sys.stderr, disable=args.quiet, leave=False)

    def on_step(step):
        bar.total = step.total
        bar.update(1)
        if args.preview and (step.index % every == 0 or step.index == step.total - 1):
            frames.append(pipe.decode_latents(step.latents[:1])[0])

    result = pipe.run(req, callback=on_step)
    bar.close()
    scheduler = req.scheduler or scheduler_name_for_config(pipe.scheduler_config)
    for i, (path, image) in enumerate(zip(outs, result.images)):
        params = format_parameters(
            prompt=args.prompt, negative_prompt=args.negative_prompt or "", steps=req.steps, scheduler=scheduler,
            guidance=req.guidance, seed=req.seed, height=req.height, width=req.width,
            model=Path(str(pipe.manifest.data["source"].get("path", ""))).name,
            strength=req.strength if init is not None else None,
            extra={"Batch size": req.batch, "Batch pos": i} if req.batch > 1 else None)
        try:
            save_png(image, path, params)
        except OSError as e:
            raise UserError(f"{path}: could not write ({e.strerror or e})") from None
        print(path)
    if args.preview:
        frames.append(result.images[0])
        try:
            save_gif(frames, args.preview, duration_ms=200)
        except OSError as e:
            raise UserError(f"{args.preview}: could not write ({e.strerror or e})") from None
        print(args.preview)
    t = result.timings
    steps = t["unet_step_ms"]
    print(f"seed {req.seed}; text encoder {t['text_encoder_ms']:.0f} ms, UNet {sum(steps) / 1e3:.2f} s "
          f"({len(steps)} steps, {sum(steps) / len(steps):.0f} ms/step), VAE decode {t['vae_decode_ms']:.0f} ms, "
          f"total {t['total_s']:.2f} s", file=sys.stderr)
    return 0


def add_generate(sub) -> None:
    from sdrt.runtime.backends import BACKENDS, DEFAULT_BACKEND
    from sdrt.runtime.schedulers import SCHEDULER_NAMES

    p = sub.add_parser("generate", help="generate images from an engine directory (txt2img, img2img)",
                       description="Generate images with the torch-free runtime. Seeds mean what they mean in "
                                   "diffusers with a CPU torch.Generator.")
    p.add_argument("engine_dir", metavar="ENGINE_DIR")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("-o", "--output", default="out.png",
                   help="PNG to write (default out.png); with --num-images N: OUT-0.png ... OUT-{N-1}.png")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5; <=1 disables)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: random, printed)")
    p.add_argument("--scheduler", default=None, metavar="NAME",
                   help=f"one of {', '.join(SCHEDULER_NAMES)} (default: the model's own)")
    p.add_argument("--height", type=int, default=None, help="default: the model's (img2img: the init image's)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1, metavar="N")
    p.add_argument("--init-image", default=None, metavar="PATH", help="img2img: start from this image")
    p.add_argument("--strength", type=float, default=0.8, help="img2img: how much to change the image (0, 1]")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=list(BACKENDS),
                   help="; ".join(f"{k}: {v}" for k, v in BACKENDS.items()))
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA (.safetensors, kohya or diffusers/peft keys) at load, scale 1 unless given; "
                        "repeatable; no re-export")
    p.add_argument("--preview", default=None, metavar="OUT.gif", help="also write the latents decoded every few steps")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)
