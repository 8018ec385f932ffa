"""`sdrt bench`: latency and parity of sdrt against the PyTorch (diffusers) reference, side by side.

The sdrt side needs only the runtime; the reference side needs the `export` extra (torch, diffusers), and
the plot needs the `bench` extra (matplotlib).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sdrt._signals import terminate_as_interrupt
from sdrt.bench.runner import Settings, run_bench
from sdrt.runtime.modes import mode_name, parse_mode
from sdrt.runtime.manifest import write_json_atomic, write_text_atomic


@terminate_as_interrupt
def _cmd_bench(args) -> int:
    from sdrt.bench.report import markdown, plot

    settings = Settings(steps=args.steps, height=args.height, width=args.width, batch=args.batch, runs=args.runs,
                        warmup=args.warmup, guidance=args.guidance, scheduler=args.scheduler, seed=args.seed,
                        prompt=args.prompt, negative_prompt=args.negative_prompt, backend=args.backend,
                        reference_device=args.reference_device, threads=args.threads, embeddings=tuple(args.embedding),
                        mode=mode_name(args.precision, args.cache_interval, args.vae), compare_mode=args.compare_mode)
    if args.compare_mode is not None:
        settings.compare_mode = mode_name(**parse_mode(args.compare_mode))  # checked and spelled as reported
    result = run_bench(args.engine_dir, args.reference, settings, progress=not args.quiet,
                       outputs={"json": args.json, "markdown": args.markdown, "plot": args.plot},
                       allow_other_reference=args.allow_other_reference)
    table = markdown(result)
    print(table, end="")
    if args.json:
        write_json_atomic(Path(args.json), result)
    if args.markdown:
        write_text_atomic(Path(args.markdown), table)
    if args.plot:
        plot(result, args.plot)
    return 0


def add_subcommand(sub) -> None:
    from sdrt.runtime.backends import BACKENDS
    from sdrt.runtime.cli import add_mode_options
    from sdrt.runtime.settings import add_options

    d = Settings()
    p = sub.add_parser("bench", help="latency and parity against the PyTorch reference",
                       description="Time sdrt (and, with --reference, diffusers on the same checkpoint, same "
                                   "settings and seed) in separate processes, alternating, after warm-up; "
                                   "measure parity in the same run. UNet times are per UNet evaluation: PNDM "
                                   "makes one more than its steps, Heun almost twice as many.")
    p.add_argument("engine_dir", metavar="ENGINE_DIR")
    p.add_argument("--reference", metavar="MODEL_DIR", default=None,
                   help="the diffusers checkpoint ENGINE_DIR was exported from (enables ratios and parity); "
                        "another checkpoint is refused (its configs' sha256 differs from the manifest's)")
    p.add_argument("--allow-other-reference", action="store_true",
                   help="compare with a --reference that is not ENGINE_DIR's source anyway, after a warning")
    # the settings bench shares with `sdrt generate`, with bench's own defaults where it has them
    add_options(p, ("steps", "height", "width"), defaults={"steps": d.steps})
    p.add_argument("--batch", metavar="N", type=int, default=d.batch, help=f"images per run (default {d.batch})")
    p.add_argument("--runs", metavar="N", type=int, default=d.runs, help=f"timed runs per side (default {d.runs})")
    p.add_argument("--warmup", metavar="N", type=int, default=d.warmup,
                   help=f"untimed runs per side first (default {d.warmup})")
    add_options(p, ("guidance", "scheduler", "seed"), defaults={"guidance": d.guidance, "seed": d.seed})
    p.add_argument("--prompt", metavar="TEXT", default=d.prompt,
                   help=f"default {d.prompt!r}; read as `sdrt generate` reads it (chunks beyond 75 tokens, "
                        "(word:1.3) weights); the reference gets the same reading through prompt_embeds when "
                        "diffusers' own would differ")
    p.add_argument("--negative-prompt", default=d.negative_prompt, metavar="TEXT")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="a textual-inversion embedding, loaded by both sides (repeatable)")
    p.add_argument("--backend", default=d.backend, choices=list(BACKENDS), help=f"sdrt's side (default {d.backend})")
    add_mode_options(p)
    p.add_argument("--compare-mode", default=None, metavar="MODE",
                   help="also run sdrt in this mode alongside (words joined by '+': fp32|bf16, cacheN, tiny-vae; "
                        "e.g. fp32+cache3+tiny-vae); the report gives its ratios to the first mode and to diffusers")
    p.add_argument("--reference-device", default=d.reference_device, choices=["cpu", "cuda"],
                   help=f"diffusers' side (default {d.reference_device})")
    p.add_argument("--threads", metavar="N", type=int, default=None,
                   help="CPU threads per side, >= 1 (default: all cores; every backend but tensorrt)")
    p.add_argument("--json", metavar="F", default=None, help="also write the results as JSON")
    p.add_argument("--markdown", metavar="F", default=None, help="also write the table printed")
    p.add_argument("--plot", metavar="F.png", default=None, help="also plot stage times and parity (PNG)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench)


__all__ = ["Settings", "run_bench", "add_subcommand"]
