"""`sdrt generate`: txt2img and img2img from the command line (torch-free)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sdrt._signals import terminate_as_interrupt
from sdrt.errors import UserError
from sdrt.runtime.settings import SETTING, TABLE, add_options

# the settings `sdrt generate` takes as options (the prompt is its argument), in --help's order
GENERATE_OPTIONS = tuple(s.name for s in TABLE if s.flag)


def _out_paths(out: str, n: int) -> list[Path]:
    """``-o x.png`` with n > 1 writes x-0.png ... x-{n-1}.png."""
    p = Path(out)
    if p.suffix.lower() != ".png":
        raise UserError(f"-o {out!r}: output must be a .png file")
    if n == 1:
        return [p]
    return [p.with_name(f"{p.stem}-{i}{p.suffix}") for i in range(n)]


@terminate_as_interrupt
def _cmd_generate(args) -> int:
    from tqdm import tqdm

    from sdrt.runtime.images import save_gif, save_png
    from sdrt.runtime.pipeline import Pipeline
    from sdrt.runtime.schedulers import scheduler_name_for_config, steps_phrase
    from sdrt.runtime.settings import request_parameters

    if args.preview and not args.preview.lower().endswith(".gif"):
        raise UserError(f"--preview {args.preview!r}: must be a .gif file")
    refusal = SETTING["strength"].mode_refusal(args.strength, bool(args.init_image), "--strength", "--init-image")
    if refusal:
        raise UserError(refusal)
    _out_paths(args.output, 1)  # refuse a bad -o before loading anything
    for target in filter(None, (args.output, args.preview)):
        parent = Path(target).resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise UserError(f"{target!r}: cannot write into {str(parent)!r}")
    pipe = Pipeline(args.engine_dir, backend=args.backend, embeddings=args.embedding, loras=args.lora,
                    **mode_options(args))
    # with --init-image, --height/--width resize the image (as load_init_image does), which then sets the size
    req = pipe.request(args.prompt, **{name: getattr(args, name) for name in GENERATE_OPTIONS})
    outs = _out_paths(args.output, req.batch)
    frames: list = []
    every = max(1, req.steps // 12)
    bar = tqdm(total=None, desc="denoise", unit=" UNet evaluations", file=sys.stderr, disable=args.quiet,
               leave=False)

    def on_step(step):
        bar.total = step.total
        bar.update(1)
        if args.preview and (step.index % every == 0 or step.index == step.total - 1):
            frames.append(pipe.decode_preview(step.latents[:1])[0])

    result = pipe.run(req, callback=on_step)
    bar.close()
    scheduler = scheduler_name_for_config(pipe.scheduler_config)
    model = Path(str(pipe.manifest.data["source"].get("path", ""))).name
    for i, (path, image) in enumerate(zip(outs, result.images)):
        params = request_parameters(req, scheduler, model, i)
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
    unet = t["unet_step_ms"]  # one entry per UNet evaluation
    print(f"seed {req.seed}; {steps_phrase(req.steps, len(unet))}: text encoder {t['text_encoder_ms']:.0f} ms, "
          f"UNet {sum(unet) / 1e3:.2f} s ({sum(unet) / len(unet):.0f} ms per UNet evaluation), "
          f"VAE decode {t['vae_decode_ms']:.0f} ms, total {t['total_s']:.2f} s; mode {pipe.mode}",
          file=sys.stderr)
    return 0


def mode_options(args) -> dict:
    """Pipeline's mode arguments from the options add_mode_options adds."""
    return {"precision": args.precision, "cache_interval": args.cache_interval, "vae": args.vae}


def add_mode_options(p) -> None:
    """--precision, --cache-interval, --vae: the same names in generate, bench and serve."""
    from sdrt.runtime.pipeline import VAES
    from sdrt.runtime.precision import PRECISIONS

    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32 (default; exact parity) or bf16: the UNet and text encoder in bf16 on the openvino "
                        "backend, VAE fp32; needs a CPU with bf16 arithmetic (AVX512_BF16 or AMX), refused elsewhere")
    p.add_argument("--cache-interval", type=int, default=None, metavar="N",
                   help="feature caching across steps: the full UNet every N UNet evaluations, the shallow UNet on "
                        "its cached deep feature between (needs `sdrt export --cache-branch`; default off). "
                        "Quality cost per N: README")
    p.add_argument("--vae", default="full", choices=VAES,
                   help="decoder of the final images: full (default) or tiny (the AutoencoderTiny decoder from "
                        "`sdrt export --tiny-vae`). Previews use the tiny one whenever the engine has it")


def add_generate(sub) -> None:
    from sdrt.runtime.backends import BACKENDS, DEFAULT_BACKEND

    p = sub.add_parser("generate", help="generate images from an engine directory (txt2img, img2img)",
                       description="Generate images with the torch-free runtime (SD1.x, SD2.x, SDXL base and "
                                   "refiner, SD-Turbo, SDXL-Turbo, LCM). Seeds mean what they mean in diffusers "
                                   "with a CPU torch.Generator. An SDXL refiner only refines: give --init-image.")
    p.add_argument("engine_dir", metavar="ENGINE_DIR")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("-o", "--output", default="out.png",
                   help="PNG to write (default out.png); with --num-images N: OUT-0.png ... OUT-{N-1}.png")
    add_options(p, GENERATE_OPTIONS[:GENERATE_OPTIONS.index("truncate")])
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="a textual-inversion embedding (.safetensors), used in prompts as TOKEN (default: the file's "
                        "name without .safetensors); repeatable")
    add_options(p, GENERATE_OPTIONS[GENERATE_OPTIONS.index("truncate"):])
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=list(BACKENDS),
                   help="; ".join(f"{k}: {v}" for k, v in BACKENDS.items()))
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA (.safetensors, kohya or diffusers/peft keys) at load, scale 1 unless given; "
                        "repeatable; no re-export")
    add_mode_options(p)
    p.add_argument("--preview", default=None, metavar="OUT.gif",
                   help="also write the latents decoded every few steps (with the tiny VAE decoder when the engine has one)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)
