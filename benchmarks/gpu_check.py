"""The work behind benchmarks/gpu_check.sh; each section records ok/skipped/failed with its reason.

    python benchmarks/gpu_check.py --out build/gpu_check [--skip-sd15] [--steps 20] [--runs 10]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = {"sd1-tiny": dict(size=64, steps=4), "sd15": dict(size=512, steps=20)}
PROMPT = "a photograph of an astronaut riding a horse"


def have(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def section(results: dict, name: str, fn, *args):
    t0 = time.perf_counter()
    try:
        value = fn(*args)
        results[name] = {"status": "ok", **(value or {})}
    except SkipCheck as e:
        results[name] = {"status": "skipped", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - a check script records every failure and moves on
        results[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                         "traceback": traceback.format_exc(limit=6)}
    results[name]["wall_s"] = round(time.perf_counter() - t0, 2)
    print(f"[gpu_check] {name}: {results[name]['status']} {results[name].get('reason', results[name].get('error', ''))}",
          flush=True)


class SkipCheck(Exception):
    pass


def environment() -> dict:
    env = {"python": sys.version.split()[0]}
    for mod in ("torch", "tensorrt", "polygraphy", "onnx_graphsurgeon", "onnxruntime", "diffusers"):
        if have(mod):
            try:
                env[mod] = __import__(mod).__version__
            except Exception as e:  # noqa: BLE001
                env[mod] = f"import failed: {e}"
        else:
            env[mod] = None
    env["cuda_python"] = have("cuda")
    if env["torch"]:
        import torch
        env["torch_cuda"] = torch.cuda.is_available()
        if env["torch_cuda"]:
            env["gpu"] = torch.cuda.get_device_name(0)
    return env


def cuda_buffers() -> dict:
    if not have("cuda"):
        raise SkipCheck("cuda-python is not installed")
    from sdrt.runtime.backends import cuda

    name, cc = cuda.device_info()
    a = np.random.default_rng(0).standard_normal((2, 4, 64, 64)).astype(np.float32)
    b = cuda.roundtrip(a)
    if not np.array_equal(a, b):
        raise AssertionError("host -> device -> host copy changed the data")
    big = np.arange(1 << 24, dtype=np.float16)
    if not np.array_equal(cuda.roundtrip(big), big):
        raise AssertionError("64 MiB fp16 roundtrip changed the data")
    return {"gpu": name, "compute_capability": cc}


def sdrt_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sdrt", *args], check=True, cwd=ROOT)


def make_checkpoint(kind: str, out: Path) -> dict:
    from tools.make_models import make_model

    model = out / "models" / kind
    if not (model / "model_index.json").is_file():
        make_model(kind, model, seed=0)
    return {"model": str(model)}


def export(kind: str, out: Path) -> dict:
    engine = out / "engines" / kind
    if not (engine / "sdrt.json").is_file():
        sdrt_cli("export", str(out / "models" / kind), str(engine), "--force", "-q")
    return {"engine_dir": str(engine)}


def build(kind: str, out: Path) -> dict:
    if not have("tensorrt"):
        raise SkipCheck("tensorrt is not installed")
    from sdrt.engines.build import build_engines

    size = KINDS[kind]["size"]
    entries = build_engines(out / "engines" / kind, precision="fp16", batch=(1, 1, 1), height=(size,) * 3,
                            width=(size,) * 3, timing_cache=str(out / "timing.cache"), opt_level=3)
    return {"engines": {e["plan"].split("/")[-1].removesuffix(".plan"): {
        k: e[k] for k in ("key", "precision", "fallback_fp32", "fp32_layers", "parity", "build_s", "size_bytes")}
        for e in entries}}


def _ms(fn, runs: int, sync) -> dict:
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"p50": float(np.percentile(times, 50)), "p90": float(np.percentile(times, 90))}


def stage_feeds(manifest, size: int) -> dict:
    from sdrt.engines.parity import random_feeds

    m = manifest.data["model"]
    lat = size // m["vae_scale_factor"]
    L, H, C = m["text_max_length"], m["text_hidden_size"], m["latent_channels"]
    shapes = {"text_encoder": {"input_ids": [2, L]},
              "unet": {"sample": [2, C, lat, lat], "timestep": [2], "encoder_hidden_states": [2, L, H]},
              "vae_decoder": {"latent_sample": [1, C, lat, lat]}}
    return {c: random_feeds(manifest.component(c)["inputs"], s, m) for c, s in shapes.items()}


def sdrt_stages(kind: str, out: Path, runs: int) -> dict:
    if not have("tensorrt"):
        raise SkipCheck("tensorrt is not installed")
    from sdrt.runtime.backends.tensorrt import TensorRTBackend
    from sdrt.runtime.manifest import Manifest

    manifest = Manifest.load(out / "engines" / kind)
    feeds = stage_feeds(manifest, KINDS[kind]["size"])
    res = {}
    for graph in (False, True):
        backend = TensorRTBackend(cuda_graph=graph)
        for comp, f in feeds.items():
            s = backend.load(manifest, comp)
            res[f"{comp}_ms" + ("_cuda_graph" if graph else "")] = _ms(lambda: s.run(f), runs, lambda: None)
            s.close()
    return res


def diffusers_stages(kind: str, out: Path, runs: int) -> dict:
    if not have("torch"):
        raise SkipCheck("torch is not installed")
    import torch
    if not torch.cuda.is_available():
        raise SkipCheck("PyTorch has no CUDA device")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "models" / kind, torch_dtype=torch.float16,
                                                   safety_checker=None).to("cuda")
    size, steps = KINDS[kind]["size"], KINDS[kind]["steps"]
    lat = size // pipe.vae_scale_factor
    ids = torch.randint(0, 256, (2, pipe.tokenizer.model_max_length), device="cuda")
    sample = torch.randn(2, pipe.unet.config.in_channels, lat, lat, device="cuda", dtype=torch.float16)
    ctx = torch.randn(2, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size,
                      device="cuda", dtype=torch.float16)
    t = torch.tensor([500, 500], device="cuda")
    latents = torch.randn(1, pipe.unet.config.in_channels, lat, lat, device="cuda", dtype=torch.float16)
    sync = torch.cuda.synchronize
    res = {}
    with torch.inference_mode():
        res["text_encoder_ms"] = _ms(lambda: pipe.text_encoder(ids), runs, sync)
        res["unet_step_ms"] = _ms(lambda: pipe.unet(sample, t, encoder_hidden_states=ctx), runs, sync)
        res["vae_decode_ms"] = _ms(lambda: pipe.vae.decode(latents), runs, sync)
        gen = lambda: pipe(PROMPT, height=size, width=size, num_inference_steps=steps,  # noqa: E731
                           generator=torch.Generator("cpu").manual_seed(0), output_type="np")
        res["end_to_end_ms"] = _ms(gen, max(2, runs // 5), sync)
        image = (pipe(PROMPT, height=size, width=size, num_inference_steps=steps,
                      generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0] * 255).round()
    np.save(out / f"diffusers_fp16_{kind}.npy", image.astype(np.uint8))
    return res


def pipeline_psnr(kind: str, out: Path, runs: int) -> dict:
    """sdrt on TensorRT vs diffusers fp16 (same seed, same scheduler) end to end, and image PSNR."""
    if not have("tensorrt"):
        raise SkipCheck("tensorrt is not installed")
    from sdrt.engines.parity import psnr
    from sdrt.runtime.pipeline import Pipeline

    size, steps = KINDS[kind]["size"], KINDS[kind]["steps"]
    res = {}
    for graph in (False, True):
        pipe = Pipeline(out / "engines" / kind, backend="tensorrt", backend_options={"cuda_graph": graph})
        run = lambda: pipe.generate(PROMPT, steps=steps, seed=0, height=size, width=size)  # noqa: E731
        res["end_to_end_ms" + ("_cuda_graph" if graph else "")] = _ms(run, max(2, runs // 5), lambda: None)
        image = run().images[0]
        pipe.close()
    ref_path = out / f"diffusers_fp16_{kind}.npy"
    if ref_path.is_file():
        res["image_psnr_db_vs_diffusers_fp16"] = psnr(image, np.load(ref_path))
    if kind == "sd1-tiny":
        cpu = Pipeline(out / "engines" / kind, backend="onnxruntime")
        res["image_psnr_db_vs_sdrt_onnxruntime_fp32"] = psnr(
            image, cpu.generate(PROMPT, steps=steps, seed=0, height=size, width=size).images[0])
        cpu.close()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "build" / "gpu_check"))
    ap.add_argument("--skip-sd15", action="store_true")
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"environment": environment()}
    section(results, "cuda_buffers", cuda_buffers)
    for kind in ("sd1-tiny",) + (() if args.skip_sd15 else ("sd15",)):
        r = results.setdefault(kind, {})
        section(r, "checkpoint", make_checkpoint, kind, out)
        if r["checkpoint"]["status"] != "ok":
            continue
        # The diffusers fp16 reference needs only the checkpoint and PyTorch CUDA, not TensorRT.
        section(r, "diffusers_fp16", diffusers_stages, kind, out, args.runs)
        section(r, "export", export, kind, out)
        if r["export"]["status"] != "ok":
            continue
        section(r, "build", build, kind, out)
        if r["build"]["status"] == "ok":
            section(r, "sdrt_tensorrt_stages", sdrt_stages, kind, out, args.runs)
            section(r, "sdrt_tensorrt_pipeline", pipeline_psnr, kind, out, args.runs)
            d, s = r["diffusers_fp16"], r["sdrt_tensorrt_stages"]
            if d["status"] == "ok" and s["status"] == "ok":
                r["ratio_sdrt_over_diffusers"] = {
                    "text_encoder": s["text_encoder_ms"]["p50"] / d["text_encoder_ms"]["p50"],
                    "unet_step": s["unet_ms"]["p50"] / d["unet_step_ms"]["p50"],
                    "vae_decode": s["vae_decoder_ms"]["p50"] / d["vae_decode_ms"]["p50"]}
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"[gpu_check] results in {out / 'gpu_check.json'}")

    def failed(d):
        return any(v.get("status") == "failed" if "status" in v else failed(v)
                   for v in d.values() if isinstance(v, dict))
    return 1 if failed({k: v for k, v in results.items() if k != "environment"}) else 0


if __name__ == "__main__":
    sys.exit(main())
