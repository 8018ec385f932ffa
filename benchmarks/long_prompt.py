"""What a prompt of k chunks costs per UNet step on the SD1.5 architecture (77 * k text tokens, guidance).

Only the UNet's cross-attention layers (``attn2`` of each transformer block: to_k and to_v over the text, and
attention over its tokens) read the text; every other layer costs the same whatever the prompt's length. Two
ways to measure, both on ONNX Runtime's CPU provider with sdrt's session options and graph form (attention as
``com.microsoft.MultiHeadAttention``), batch 2 (guidance), one warm-up call then ``--runs`` rounds that time
each prompt length in turn; ``--threads 1 --clock cpu`` counts CPU time, which others' load hardly moves.

By default: SD1.5's 16 cross-attention layers as they sit in the UNet (their widths, heads and image-token
counts read from the architecture built on torch's meta device: no weights), each exported alone with random
weights; the step's cost of k chunks is the sum over layers. Needs under 1 GB and about a minute.

    .venv/bin/python benchmarks/long_prompt.py [--size 512] [--threads 2] [--runs 5] [--clock wall|cpu]

``--engine-dir``: the whole UNet, sdrt's CPU graph, timed at each prompt length. Needs the full-size UNet
exported (3.4 GB of weights; the export peaks near 8 GB, the timing near 4 GB):

    .venv/bin/python -m tools.make_models sd15 build/models/sd15
    .venv/bin/python -m sdrt export build/models/sd15 build/engines/sd15-unet --components unet
    .venv/bin/python benchmarks/long_prompt.py --engine-dir build/engines/sd15-unet [--size 512]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from timing import time_interleaved

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SD15_TEXT_TOKENS = 77  # SD1.5's CLIP reads 77 tokens per chunk (the engine directory's text_max_length)


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    from sdrt.runtime.backends.onnxruntime import OnnxRuntimeBackend

    opts = OnnxRuntimeBackend("cpu", threads=threads).session_options()
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def cross_attention_layers(size: int) -> tuple[dict, list[tuple[object, int]]]:
    """SD1.5's UNet config, and each cross-attention module (of a meta-device UNet) with its image tokens."""
    import torch
    from diffusers import UNet2DConditionModel

    from tools.make_models import _configs

    config = _configs("sd15")["unet"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    latent = size // 8  # SD1.5's VAE scale factor
    layers = []
    levels = [(block, i) for i, block in enumerate(unet.down_blocks)] + [(unet.mid_block, len(unet.down_blocks) - 1)]
    levels += [(block, len(unet.up_blocks) - 1 - i) for i, block in enumerate(unet.up_blocks)]
    for block, level in levels:
        side = latent // 2 ** level
        for attention in getattr(block, "attentions", None) or []:
            for transformer in attention.transformer_blocks:
                layers.append((transformer.attn2, side * side))
    return config, layers


def export_attention(attn2, out: Path) -> Path:
    """One cross-attention layer as sdrt's CPU graph has it, random weights, the text length dynamic."""
    import torch
    from diffusers.models.attention_processor import Attention

    from sdrt.export.attention import CONTRIB_DOMAIN, FusedAttnProcessor

    inner, cross = attn2.to_q.out_features, attn2.to_k.in_features
    layer = Attention(query_dim=attn2.to_q.in_features, cross_attention_dim=cross, heads=attn2.heads,
                      dim_head=inner // attn2.heads).eval()
    layer.set_processor(FusedAttnProcessor())

    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = layer

        def forward(self, hidden_states, encoder_hidden_states):
            return self.attn(hidden_states, encoder_hidden_states)

    x = torch.randn(2, 64, attn2.to_q.in_features)
    text = torch.randn(2, SD15_TEXT_TOKENS, cross)
    with torch.no_grad():
        torch.onnx.export(Graph(), (x, text), str(out), dynamo=False, opset_version=17,
                          input_names=["hidden_states", "encoder_hidden_states"], output_names=["out"],
                          dynamic_axes={"hidden_states": {1: "tokens"}, "encoder_hidden_states": {1: "sequence"}},
                          custom_opsets={CONTRIB_DOMAIN: 1})
    return out


def attention_only(size: int, threads: int, runs: int, chunks: list[int], clock) -> dict:
    config, layers = cross_attention_layers(size)
    hidden = config["cross_attention_dim"]
    rng = np.random.default_rng(0)
    kinds: dict[tuple, dict] = {}
    for attn2, tokens in layers:
        key = (attn2.to_q.in_features, attn2.heads, tokens)
        kinds.setdefault(key, {"layers": 0, "attn2": attn2})["layers"] += 1
    calls = {}
    with tempfile.TemporaryDirectory() as tmp:
        for (width, heads, tokens), kind in kinds.items():
            session = ort_session(export_attention(kind.pop("attn2"), Path(tmp) / f"a{width}-{tokens}.onnx"), threads)
            x = rng.standard_normal((2, tokens, width), dtype=np.float32)
            for k in chunks:
                feeds = {"hidden_states": x,
                         "encoder_hidden_states": rng.standard_normal((2, SD15_TEXT_TOKENS * k, hidden), dtype=np.float32)}
                calls[(width, heads, tokens), k] = lambda s=session, f=feeds: s.run(None, f)
    ms = time_interleaved(calls, runs, clock)
    for (width, heads, tokens), kind in kinds.items():
        kind["ms"] = {k: ms[(width, heads, tokens), k] for k in chunks}
        print(f"{kind['layers']:2d} layers of width {width}, {heads} heads, {tokens} image tokens: "
              + ", ".join(f"{k} chunk{'s' if k > 1 else ''} {v:.2f} ms" for k, v in kind["ms"].items()), file=sys.stderr)
    per_step = {k: sum(kind["layers"] * kind["ms"][k] for kind in kinds.values()) for k in chunks}
    return {"mode": "cross-attention layers", "layers": len(layers), "text_tokens": SD15_TEXT_TOKENS,
            "kinds": [{"width": w, "heads": h, "image_tokens": t, "layers": kind["layers"], "ms": kind["ms"]}
                      for (w, h, t), kind in kinds.items()],
            "cross_attention_ms_per_step": per_step}


def whole_unet(engine_dir: Path, size: int, threads: int, runs: int, chunks: list[int], clock) -> dict:
    manifest = json.loads((engine_dir / "sdrt.json").read_text())
    unet = manifest["components"]["unet"]
    model = manifest["model"]
    if isinstance(unet["inputs"][2]["shape"][1], int):
        raise SystemExit(f"{engine_dir}: its UNet takes {unet['inputs'][2]['shape'][1]} text tokens only; re-export it")
    session = ort_session(engine_dir / unet.get("variants", {}).get("cpu", unet)["file"], threads)
    rng = np.random.default_rng(0)
    latent = size // model["vae_scale_factor"]
    x = rng.standard_normal((2, model["latent_channels"], latent, latent), dtype=np.float32)
    t = np.full((2,), 500.0, np.float32)
    calls = {}
    for k in chunks:
        text = rng.standard_normal((2, model["text_max_length"] * k, model["text_hidden_size"]), dtype=np.float32)
        calls[k] = lambda f={"sample": x, "timestep": t, "encoder_hidden_states": text}: session.run(None, f)
    step = time_interleaved(calls, runs, clock)
    return {"mode": "whole UNet", "unet_step_ms": step, "text_tokens": model["text_max_length"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--chunks", default="1,2,3", help="prompt lengths to time, in chunks (default 1,2,3)")
    ap.add_argument("--engine-dir", default=None, help="time the whole exported UNet instead of its cross-attention")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or this process's CPU time (with --threads 1: steady on a machine others load)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.engine_dir:
        result = whole_unet(Path(args.engine_dir), args.size, args.threads, args.runs, chunks, clock)
        base = result["unet_step_ms"]
    else:
        result = attention_only(args.size, args.threads, args.runs, chunks, clock)
        base = result["cross_attention_ms_per_step"]
    result.update(size=args.size, threads=args.threads, runs=args.runs, clock=args.clock,
                  load_average=os.getloadavg())
    print(f"| prompt | text tokens | {result['mode']}: ms per step (batch 2, {args.size} px, {args.threads} "
          f"thread{'s' if args.threads > 1 else ''}, {args.clock} time) | vs 1 chunk |")
    print("|---|---:|---:|---:|")
    for k in chunks:
        print(f"| {k} chunk{'s' if k > 1 else ''} | {result['text_tokens'] * k} | {base[k]:.1f} | "
              f"{base[k] - base[chunks[0]]:+.1f} ms |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
