"""A benchmark worker: one side (sdrt or diffusers) in its own process, driven by JSON lines on stdin.

Each side is a whole process, as users run it, so its load time and peak memory are its own. Arrays cross
the process boundary as .npy files in a scratch folder.

    python -m sdrt.bench.worker sdrt ENGINE_DIR --backend cpu
    python -m sdrt.bench.worker diffusers MODEL_DIR --device cpu
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Sequence
from pathlib import Path

import numpy as np

from sdrt.errors import UserError


class SdrtSide:
    def __init__(self, path: str, backend: str, threads: int | None, embeddings: Sequence[str] = (),
                 mode: str = "fp32"):
        from sdrt.runtime import Pipeline
        from sdrt.runtime.backends import THREADED_BACKENDS
        from sdrt.runtime.modes import parse_mode

        opts = {"threads": threads} if threads and backend in THREADED_BACKENDS else {}
        self.pipe = Pipeline(path, backend=backend, backend_options=opts, embeddings=embeddings, **parse_mode(mode))
        self.backend = self.pipe.backend.describe()
        self.mode = self.pipe.mode

    def generate(self, s: dict, record: bool) -> dict:
        latents = []
        result = self.pipe.generate(
            s["prompt"], s["negative_prompt"], steps=s["steps"], guidance=s["guidance"], seed=s["seed"],
            scheduler=s["scheduler"], height=s["height"], width=s["width"], num_images=s["batch"],
            callback=(lambda st: latents.append(st.latents.copy())) if record else None)
        t = result.timings
        timings = {"text_encoder_ms": t["text_encoder_ms"], "unet_step_ms": t["unet_step_ms"],
                   "vae_decode_ms": t["vae_decode_ms"], "end_to_end_s": t["total_s"]}
        return {"timings": timings, "image": np.stack(result.images), "latents": np.stack(latents) if record else None}

    def component(self, name: str, inputs: dict) -> dict:
        """A component's outputs; in this side's mode: the UNet it runs at a full step (the deep one with
        feature caching), the VAE decoder it decodes with (the tiny one with ``--vae tiny``)."""
        pipe = self.pipe
        if name == "vae_decoder":  # unscaled latents in, as diffusers' decoder takes them
            return {"sample": pipe.vae_decode(inputs["latent_sample"] * np.float32(pipe.model.scaling_factor))}
        return pipe.sessions[pipe.unet_component if name == "unet" else name].run(inputs)

    def gpu_peak_mb(self):
        return None


class DiffusersSide:
    def __init__(self, path: str, device: str, threads: int | None, embeddings: Sequence[str] = ()):
        import torch

        from sdrt.bench.reference import diffusers_pipeline

        from sdrt.runtime.embeddings import parse_embedding_arg

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        dtype = torch.float16 if device == "cuda" else torch.float32
        self.pipe = diffusers_pipeline(path, dtype=dtype).to(device)  # SD, LCM or SDXL, as the checkpoint says
        self.pipe.set_progress_bar_config(disable=True)
        for spec in embeddings:  # the token as sdrt names it: the one given, else the file's stem
            file, token = parse_embedding_arg(spec)
            self.pipe.load_textual_inversion(str(file), token=token or file.stem)
        self.backend = f"diffusers {device} {str(dtype).replace('torch.', '')} (torch {torch.__version__})"
        self._times: dict[str, list[float]] = {}
        for name in ("text_encoder", "text_encoder_2"):  # SDXL's two count as one stage, as in sdrt's timings
            if getattr(self.pipe, name, None) is not None:
                self._hook(getattr(self.pipe, name), "text_encoder")
        self._hook(self.pipe.unet, "unet")
        vae = self.pipe.vae
        inner_decode = vae.decode

        def timed_decode(*a, **kw):
            self._sync()
            t0 = time.perf_counter()
            out = inner_decode(*a, **kw)
            self._sync()
            self._times.setdefault("vae_decode", []).append((time.perf_counter() - t0) * 1e3)
            return out

        vae.decode = timed_decode

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def _hook(self, module, name):
        starts = []

        def pre(_m, _a):
            self._sync()
            starts.append(time.perf_counter())

        def post(_m, _a, _o):
            self._sync()
            self._times.setdefault(name, []).append((time.perf_counter() - starts.pop()) * 1e3)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def _scheduler(self, name):
        from sdrt.bench.reference import diffusers_scheduler

        return diffusers_scheduler(name, dict(self.pipe.scheduler.config))

    def generate(self, s: dict, record: bool) -> dict:
        torch = self.torch
        self.pipe.scheduler = self._scheduler(s["scheduler"])
        self._times = {}
        latents = []

        def on_step(_pipe, _i, _t, kw):
            latents.append(kw["latents"].float().cpu().numpy())
            return kw

        t0 = time.perf_counter()
        images = self.pipe(
            **self._prompts(s), num_inference_steps=s["steps"],
            guidance_scale=s["guidance"], height=s["height"], width=s["width"], num_images_per_prompt=s["batch"],
            generator=torch.Generator("cpu").manual_seed(s["seed"]), output_type="np",
            callback_on_step_end=on_step if record else None).images
        total = time.perf_counter() - t0
        timings = {"text_encoder_ms": sum(self._times.get("text_encoder", [])),
                   "unet_step_ms": self._times.get("unet", []),
                   "vae_decode_ms": sum(self._times.get("vae_decode", [])), "end_to_end_s": total}
        image = (images * 255).round().astype(np.uint8)
        return {"timings": timings, "image": image, "latents": np.stack(latents) if record else None}

    def _prompts(self, s: dict) -> dict:
        """The prompts as diffusers takes them, or, where sdrt reads them otherwise (long, weighted), their
        embeddings as AUTOMATIC1111 computes them, which is what sdrt does (sdrt.bench.reference)."""
        from sdrt.bench.reference import a1111_prompt_embeds, reads_like_diffusers

        texts = [s["prompt"], s["negative_prompt"] or ""]
        if all(reads_like_diffusers(self.pipe.tokenizer, self.pipe.maybe_convert_prompt(t, self.pipe.tokenizer))
               for t in texts):
            return {"prompt": texts[0], "negative_prompt": texts[1]}
        embeds = a1111_prompt_embeds(self.pipe, texts).to(self.pipe.unet.dtype)
        return {"prompt_embeds": embeds[:1], "negative_prompt_embeds": embeds[1:]}

    def component(self, name: str, inputs: dict) -> dict:
        from sdrt.export.graphs import graph_io, graph_module

        torch = self.torch
        pipe = self.pipe
        numbers = {"family": "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd",
                   "guidance_embedding_dim": pipe.unet.config.time_cond_proj_dim}
        models = {"text_encoder": pipe.text_encoder, "text_encoder_2": getattr(pipe, "text_encoder_2", None),
                  "unet": pipe.unet, "vae": pipe.vae}
        module = graph_module(name, models, numbers)
        inputs_names, output_names = graph_io(name, numbers)
        with torch.no_grad():
            dtype = next(module.parameters()).dtype
            args = [torch.from_numpy(inputs[n]).to(self.device) for n in inputs_names]
            args = [a.to(dtype) if a.is_floating_point() else a for a in args]
            out = module(*args)
        out = out if isinstance(out, tuple) else (out,)
        return {n: o.float().cpu().numpy() for n, o in zip(output_names, out)}

    def gpu_peak_mb(self):
        if self.device != "cuda":
            return None
        return self.torch.cuda.max_memory_allocated() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def serve(side, scratch: Path) -> None:
    """Answer one JSON command per stdin line with one JSON line on stdout."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything else a library prints must not corrupt the protocol
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            break
        try:
            reply = _answer(side, msg, scratch)
        except UserError as e:  # a bad setting: the message, not a traceback, goes back to `sdrt bench`
            reply = {"error": str(e)}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def _answer(side, msg: dict, scratch: Path) -> dict:
    cmd = msg["cmd"]
    if cmd == "generate":
        r = side.generate(msg["settings"], msg.get("record", False))
        reply = {"timings": r["timings"]}
        for key in ("image", "latents"):
            if r[key] is not None:
                path = scratch / f"{msg['tag']}-{key}.npy"
                np.save(path, r[key])
                reply[key] = str(path)
        return reply
    if cmd == "component":
        inputs = {k: np.load(v) for k, v in msg["inputs"].items()}
        reply = {"outputs": {}}
        for k, v in side.component(msg["name"], inputs).items():
            path = scratch / f"{msg['tag']}-{msg['name']}-{k}.npy"
            np.save(path, v)
            reply["outputs"][k] = str(path)
        return reply
    if cmd == "stats":
        return {"peak_rss_mb": peak_rss_mb(), "gpu_peak_mb": side.gpu_peak_mb()}
    return {"error": f"unknown command {cmd!r}"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("side", choices=["sdrt", "diffusers"])
    ap.add_argument("path")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--scratch", required=True)
    ap.add_argument("--embedding", action="append", default=[])
    ap.add_argument("--mode", default="fp32", help="sdrt's mode (sdrt.runtime.modes), e.g. bf16+cache3+tiny-vae")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.side == "sdrt":
            side = SdrtSide(args.path, args.backend, args.threads, args.embedding, args.mode)
        else:
            side = DiffusersSide(args.path, args.device, args.threads, args.embedding)
    except UserError as e:  # its last stderr line is what `sdrt bench` shows: the message, not the class name
        print(e, file=sys.stderr)
        return e.exit_code
    hello = {"ready": True, "load_s": time.perf_counter() - t0, "backend": side.backend,
             "mode": getattr(side, "mode", None)}
    sys.stdout.write(json.dumps(hello) + "\n")
    sys.stdout.flush()
    serve(side, Path(args.scratch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
