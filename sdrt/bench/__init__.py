"""`sdrt bench`: latency and parity of sdrt against the PyTorch (diffusers) reference, side by side.

The sdrt side needs only the runtime; the reference side needs the `export` extra (torch, diffusers), and
the plot needs the `bench` extra (matplotlib).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sdrt.bench.runner import Settings, run_bench
from sdrt.runtime.manifest import write_json_atomic, write_text_atomic


def _cmd_bench(args) -> int:
    from sdrt.bench.report import markdown, plot

    settings = Settings(steps=args.steps, height=args.height, width=args.width, batch=args.batch, runs=args.runs,
                        warmup=args.warmup, guidance=args.guidance, scheduler=args.scheduler, seed=args.seed,
                        prompt=args.prompt, negative_prompt=args.negative_prompt, backend=args.backend,
                        reference_device=args.reference_device, threads=args.threads, embeddings=tuple(args.embedding))
    result = run_bench(args.engine_dir, args.reference, settings, progress=not args.quiet,
                       outputs={"json": args.json, "markdown": args.markdown, "plot": args.plot})
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

    p = sub.add_parser("bench", help="latency and parity against the PyTorch reference",
                       description="Time sdrt (and, with --reference, diffusers on the same checkpoint, same "
                                   "settings and seed) in separate processes, alternating, after warm-up; "
                                   "measure parity in the same run.")
    p.add_argument("engine_dir", metavar="ENGINE_DIR")
    p.add_argument("--reference", metavar="MODEL_DIR", default=None,
                   help="the diffusers checkpoint ENGINE_DIR was exported from (enables ratios and parity)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch", type=int, default=1, help="images per run")
    p.add_argument("--runs", type=int, default=3, help="timed runs per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per side first")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=Settings.prompt,
                   help="read as `sdrt generate` reads it (chunks beyond 75 tokens, (word:1.3) weights); the "
                        "reference gets the same reading through prompt_embeds when diffusers' own would differ")
    p.add_argument("--negative-prompt", default=Settings.negative_prompt, metavar="TEXT")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="a textual-inversion embedding, loaded by both sides (repeatable)")
    p.add_argument("--backend", default="cpu", choices=list(BACKENDS))
    p.add_argument("--reference-device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="threads per side (default: all cores)")
    p.add_argument("--json", metavar="F", default=None)
    p.add_argument("--markdown", metavar="F", default=None)
    p.add_argument("--plot", metavar="F.png", default=None)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_bench)


__all__ = ["Settings", "run_bench", "add_subcommand"]
