"""`sdrt export | build | generate | bench | serve | demo`.

A user error is one line on stderr naming the bad value and what is allowed, and a non-zero exit; no traceback.
So is Ctrl-C (exit 130) at any moment, and SIGTERM (exit 143) in the commands that opt in with
``sdrt._signals.terminate_as_interrupt`` so that their Ctrl-C cleanup runs for it too.
Heavy imports happen inside each command, so `sdrt generate` works on the torch-free base install.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from typing import Callable, Sequence

from sdrt import __version__
from sdrt._signals import terminate_as_interrupt
from sdrt.errors import SdrtWarning, UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not usage + error) and exit code 2."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


@terminate_as_interrupt
def _cmd_export(args) -> int:
    from sdrt.export import export_model

    export_model(args.model_dir, args.engine_dir, force=args.force, opset=args.opset,
                 components=args.components, allow_pickle=args.allow_pickle, progress=not args.quiet,
                 loras=args.lora, vae=args.vae, prediction_type=args.prediction_type, config_dir=args.config,
                 cache_branch=args.cache_branch, tiny_vae=args.tiny_vae, controlnets=args.controlnet, add=args.add)
    print(args.engine_dir)
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a diffusers checkpoint to an ONNX engine directory",
                       description="Trace text encoder, UNet, VAE decoder and encoder to ONNX, check each against "
                                   "PyTorch (relative L2 <= 1e-4), and write ENGINE_DIR with its manifest sdrt.json. The UNet "
                                   "and VAE also get model.ort.onnx, the form ONNX Runtime's CPU provider runs "
                                   "fastest, over the same weights file and checked the same way. The text encoder and UNet "
                                   "get a weight map (where each weight went) so that LoRAs apply at run time without "
                                   "re-export. MODEL_DIR may be a single-file .safetensors checkpoint (SD1.x, SD2.x, SDXL), "
                                   "converted offline. Written into a hidden folder beside ENGINE_DIR and renamed into "
                                   "place; a failure, Ctrl-C or SIGTERM removes it, and the next export removes one a "
                                   "killed export left.")
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="a diffusers-format Stable Diffusion checkpoint folder, or one .safetensors file in the "
                        "original (LDM/SGM) layout, SD1.x, SD2.x or SDXL base, converted offline with configs sdrt "
                        "ships")
    p.add_argument("engine_dir", metavar="ENGINE_DIR", help="engine directory to write")
    p.add_argument("--force", action="store_true", help="replace ENGINE_DIR if it exists")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (14..20, default 17)")
    p.add_argument("--components", default=None,
                   help="comma-separated subset of text_encoder,unet,vae_decoder,vae_encoder (default: all)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load pickle-based weights (.bin/.ckpt) when no safetensors exist; only for trusted files")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="fuse a LoRA (.safetensors, kohya or diffusers/peft keys) into the exported UNet and text "
                        "encoder weights, scale 1 unless given; repeatable. Without it, LoRAs can still be applied "
                        "at run time (sdrt generate/serve --lora)")
    p.add_argument("--vae", default=None, metavar="FILE",
                   help="single file: a separate VAE .safetensors to use instead of (or for want of) the file's own")
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                   help="single file: what the UNet predicts (SD2.x files do not say; default: a 'v_pred' key, "
                        "else epsilon for SD1.x, else AUTOMATIC1111's test on the weights); the manifest records "
                        "which and how")
    p.add_argument("--config", default=None, metavar="DIR",
                   help="single file: a diffusers folder whose configs and tokenizer describe the file's model "
                        "(default: the ones sdrt ships for the detected family)")
    p.add_argument("--cache-branch", type=int, default=None, metavar="B",
                   help="also export the UNet as the pair feature caching runs (`--cache-interval N` at run time): "
                        "unet_deep (the UNet, also returning the hidden state that enters up-path layer B) and "
                        "unet_shallow (only the layers around skip connections 0..B, reading that cached state). "
                        "B is DeepCache's cache_branch_id: 0 is the cheapest shallow UNet")
    p.add_argument("--tiny-vae", default=None, metavar="DIR",
                   help="an AutoencoderTiny folder (TAESD architecture, diffusers layout) whose decoder is exported "
                        "beside the full one as vae_decoder_tiny (`--vae tiny` and previews at run time)")
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH[:NAME]",
                   help="also export a ControlNet (a diffusers ControlNetModel folder, or an original-layout "
                        "control_*.safetensors file converted offline) or a T2I-Adapter (a diffusers T2IAdapter "
                        "folder) as its own graph controlnet/NAME, and the UNet graph that takes its residuals "
                        "(unet_control, or unet_adapter for an adapter) over the UNet's weights file; repeatable. "
                        "NAME defaults to the folder's or file's name (without control_ and .safetensors). One "
                        "made for another model (its UNet's widths, blocks or context) is refused")
    p.add_argument("--add", action="store_true",
                   help="add the --controlnet models to the existing ENGINE_DIR (exported from MODEL_DIR) and "
                        "re-export nothing else: only controlnet/NAME, the residual UNet graph if ENGINE_DIR lacks "
                        "it, and the manifest (written beside, renamed into place) change. With --force, a "
                        "ControlNet of the same name is replaced")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_export)


def _commands() -> list[Callable]:
    """One adder per subcommand; each module imports its heavy dependencies only when its command runs."""
    from sdrt import bench, demo
    from sdrt.engines import cli as engines_cli
    from sdrt.runtime import cli as runtime_cli
    from sdrt.serve import cli as serve_cli

    return [_add_export, engines_cli.add_subcommand, runtime_cli.add_generate, bench.add_subcommand,
            serve_cli.add_subcommand, demo.add_subcommand]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdrt", description="Stable Diffusion deployment engine: export, build, generate, bench, serve.")
    parser.add_argument("--version", action="version", version=f"sdrt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in _commands():
        add(sub)
    return parser


def _one_line_warnings(prog: str, show: Callable) -> Callable:
    """sdrt's own warnings as one line each, ``sdrt generate: warning: ...``; other libraries' as they show them."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SdrtWarning):
            print(f"{prog}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


def main(argv: Sequence[str] | None = None) -> int:
    prog = "sdrt"
    try:  # building the parser imports every subcommand's module: Ctrl-C may come that early
        args = build_parser().parse_args(argv)
        prog = f"sdrt {args.command}"
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(prog, warnings.showwarning)
            return int(args.func(args) or 0)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM where a command opted in (sdrt._signals)
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"{prog}: {'terminated' if signum == signal.SIGTERM else 'interrupted'}", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
