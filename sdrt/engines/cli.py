"""``sdrt build`` arguments and entry point; ``sdrt/cli.py`` wires them in with one line."""

from __future__ import annotations

import argparse
import sys

from sdrt._signals import terminate_as_interrupt
from sdrt.engines.profiles import parse_range


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("engine_dir", metavar="ENGINE_DIR", help="engine directory made by `sdrt export`")
    parser.add_argument("--precision", default="fp16", choices=("fp16", "fp32"),
                        help="engine precision (fp16 falls back per component when unsafe; default fp16)")
    parser.add_argument("--batch", default="1:1:4", metavar="MIN:OPT:MAX",
                        help="image batch range (the UNet and a ControlNet see twice this under guidance; default "
                             "1:1:4)")
    parser.add_argument("--height", default=None, metavar="MIN:OPT:MAX",
                        help="image height range in pixels (default: half to twice the model's default; a "
                             "ControlNet's or T2I-Adapter's is rounded inward to its image_multiple)")
    parser.add_argument("--width", default=None, metavar="MIN:OPT:MAX",
                        help="image width range in pixels (default: half to twice the model's default; a "
                             "ControlNet's or T2I-Adapter's is rounded inward to its image_multiple)")
    parser.add_argument("--prompt-chunks", default="1:1:3", metavar="MIN:OPT:MAX",
                        help="prompt length range in chunks of 75 tokens (the UNet reads 77 per chunk; default "
                             "1:1:3, up to 225 tokens)")
    parser.add_argument("--static", action="store_true",
                        help="build exact-shape engines at the OPT values (enables CUDA graphs at run time)")
    parser.add_argument("--timing-cache", default=None, metavar="FILE",
                        help="TensorRT timing cache to load and update (speeds up later builds)")
    parser.add_argument("--components", default=None, metavar="LIST",
                        help="comma-separated components to build (default: all in the manifest, ControlNets' and "
                             "T2I-Adapters' controlnet/NAME and unet_control, unet_adapter included)")
    parser.add_argument("--opt-level", type=int, default=3, metavar="N",
                        help="TensorRT builder optimization level 0..5 (default 3)")
    parser.add_argument("--refittable", action="store_true",
                        help="plans whose weights can be replaced at load (LoRAs with `sdrt generate --lora`, "
                             "`sdrt serve --lora`) without a rebuild; a separate cache entry")
    parser.add_argument("--no-parity", action="store_true",
                        help="skip the fp16-vs-fp32 parity check (and so the fp32 fallback)")


@terminate_as_interrupt
def run_build(args: argparse.Namespace) -> int:
    """Parse ranges, build, print one line per component. UserErrors propagate to the CLI."""
    from sdrt.engines.build import build_engines

    batch = parse_range(args.batch, "batch")
    height = parse_range(args.height, "height") if args.height else None
    width = parse_range(args.width, "width") if args.width else None
    chunks = parse_range(args.prompt_chunks, "prompt-chunks")
    components = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    build_engines(
        args.engine_dir, precision=args.precision, batch=batch, height=height, width=width,
        static=args.static, chunks=chunks, timing_cache=args.timing_cache, components=components,
        opt_level=args.opt_level, check_parity=not args.no_parity, refittable=args.refittable,
        log=lambda line: print(line, file=sys.stderr))
    return 0


def add_subcommand(sub) -> None:
    """Register ``sdrt build`` on the top-level CLI's subparsers (what ``sdrt/cli.py`` looks for)."""
    p = sub.add_parser(
        "build", help="build TensorRT engines for an engine directory (needs an NVIDIA GPU and the gpu extra)",
        description="Build fp16 (or fp32) TensorRT plans with optimization profiles for each component (each "
                    "ControlNet or T2I-Adapter and the UNet graph taking its outputs included), check each against "
                    "ONNX Runtime fp32 (falling back to fp32 where fp16 is unsafe), and record them in "
                    "ENGINE_DIR/sdrt.json under trt/<key>/.")
    add_build_arguments(p)
    p.set_defaults(func=run_build)
