"""`sdrt bench`: sdrt and the PyTorch (diffusers) reference side by side, alternating, after warm-up, with
parity measured in the same run. Each side runs in its own worker process (sdrt.bench.worker)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sdrt import __version__
from sdrt.errors import SdrtWarning, UserError
from sdrt.runtime.manifest import Manifest
from sdrt.runtime.settings import check_size


@dataclass
class Settings:
    steps: int = 20
    height: int | None = None
    width: int | None = None
    batch: int = 1
    runs: int = 3
    warmup: int = 1
    guidance: float = 7.5
    scheduler: str | None = None
    seed: int = 0
    prompt: str = "a photograph of an astronaut riding a horse"
    negative_prompt: str = ""
    backend: str = "cpu"
    reference_device: str = "cpu"
    threads: int | None = None
    embeddings: tuple[str, ...] = ()   # textual-inversion files, FILE[:TOKEN], loaded by both sides
    mode: str = "fp32"                 # sdrt's mode (sdrt.runtime.modes: precision, cacheN, tiny-vae)
    compare_mode: str | None = None    # a second sdrt side in this mode, run alongside


class Worker:
    """One side's process; ``ask`` sends a command and waits for its one-line answer."""

    def __init__(self, name: str, argv: list[str], scratch: Path):
        self.name = name
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # stderr goes to a file: a chatty library must never fill a pipe nobody reads and stall the worker
        self.log = open(scratch / f"{name}.stderr", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sdrt.bench.worker", *argv, "--scratch", str(scratch)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        try:
            self.hello = self._read()
        except BaseException:  # a worker that failed to load, or Ctrl-C/SIGTERM while it loads
            self.close(kill=True)
            raise

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            err = self.log.read().strip().splitlines()
            raise UserError(f"bench worker {self.name!r} failed: {err[-1] if err else 'no output'}")
        return json.loads(line)

    def ask(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise UserError(f"bench worker {self.name!r}: {reply['error']}")
        return reply

    def close(self, kill: bool = False) -> None:
        """Ask the worker to quit (``kill``: end it now, e.g. when interrupted mid-run), then release its pipes."""
        if self.proc.poll() is None and kill:
            self.proc.kill()
            self.proc.wait()
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()
        self.log.close()


def percentiles(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"p50": None, "p90": None}
    return {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90))}


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / n) if n else float(np.linalg.norm(a - b))


def _component_inputs(m: Manifest, height: int, width: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Random inputs, of the shapes the manifest records, for each text encoder, the UNet and the VAE decoder."""
    rng = np.random.default_rng(seed)
    mn = m.model
    # random ids below the end-of-text id (CLIP's highest), which the manifest's tokenizer entry records
    vocab = int(m.data.get("tokenizer", m.data.get("tokenizer_2", {})).get("eos_token_id", 49407))
    lh, lw = height // mn.vae_scale_factor, width // mn.vae_scale_factor
    sizes = {"batch": 2, "latent_height": lh, "latent_width": lw, "height": height, "width": width,
             "sequence": mn.text_max_length}  # one prompt chunk
    latent = rng.standard_normal((2, mn.latent_channels, lh, lw), dtype=np.float32)
    size_ids = np.array([height, width, 0, 0, height, width][:len(mn.time_ids)], np.float32)  # SDXL's, no crop
    special = {"sample": latent, "timestep": np.full((2,), 500.0, np.float32), "time_ids": np.tile(size_ids, (2, 1))}
    inputs = {}
    for comp in (*mn.text_encoder_components, "unet"):
        feeds = {}
        for spec in m.component(comp)["inputs"]:
            name, shape = spec["name"], tuple(sizes[d] if isinstance(d, str) else d for d in spec["shape"])
            if spec["dtype"] == "int64":
                feeds[name] = rng.integers(0, vocab, shape, dtype=np.int64)
            else:
                feeds[name] = special[name] if name in special else rng.standard_normal(shape, dtype=np.float32)
        inputs[comp] = feeds
    inputs["vae_decoder"] = {"latent_sample": latent[:1] / np.float32(mn.scaling_factor)}
    return inputs


def _ratios(a: dict, b: dict) -> dict:
    """Run ``a``'s p50 times over run ``b``'s, per stage and end to end."""
    return {"unet_step": a["unet_step_ms"]["p50"] / b["unet_step_ms"]["p50"],
            "end_to_end": a["end_to_end_s"]["p50"] / b["end_to_end_s"]["p50"],
            "text_encoder": a["text_encoder_ms"]["p50"] / b["text_encoder_ms"]["p50"],
            "vae_decode": a["vae_decode_ms"]["p50"] / b["vae_decode_ms"]["p50"]}


def _environment(threads: int | None) -> dict:
    import onnxruntime

    env = {"sdrt": __version__, "python": platform.python_version(), "machine": platform.machine(),
           "cpu": _cpu_name(), "cpus": len(os.sched_getaffinity(0)), "threads": threads or len(os.sched_getaffinity(0)),
           "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    try:
        import torch

        env["torch"] = torch.__version__
        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        env["torch"] = None
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _check(manifest: Manifest, settings: Settings, outputs: dict) -> None:
    """Every setting and output path, before a worker starts."""
    from sdrt.runtime.schedulers import SCHEDULER_NAMES

    s, mn = settings, manifest.model
    if not mn.txt2img:
        raise UserError(f"{manifest.engine_dir}: this model ({mn.family}) only refines an image; `sdrt bench` times "
                        "txt2img")
    for what, v in (("height", s.height), ("width", s.width)):
        check_size(f"--{what}", v, mn.size_multiple)
    for what, v, lo in (("--runs", s.runs, 1), ("--warmup", s.warmup, 0), ("--steps", s.steps, 1),
                        ("--batch", s.batch, 1), ("--threads", 1 if s.threads is None else s.threads, 1)):
        if v < lo:
            raise UserError(f"{what} {v}: must be >= {lo}")
    if s.scheduler is not None and s.scheduler not in SCHEDULER_NAMES:
        raise UserError(f"--scheduler {s.scheduler!r}: choose one of {', '.join(SCHEDULER_NAMES)}")
    for flag, key in (("--json", "json"), ("--markdown", "markdown"), ("--plot", "plot")):
        out = outputs.get(key)
        if out and not Path(out).resolve().parent.is_dir():
            raise UserError(f"{flag} {out!r}: the folder {str(Path(out).resolve().parent)!r} does not exist")
    if outputs.get("plot") and Path(outputs["plot"]).suffix.lower() != ".png":
        raise UserError(f"--plot {outputs['plot']!r}: the plot is a PNG; name it .png")


def check_reference(manifest: Manifest, reference: str, allow_other: bool = False) -> bool:
    """Whether ``reference`` is the checkpoint the engine was exported from, by the sha256 of its configs that
    export recorded (``source.config_sha256``). Another checkpoint is refused, or with ``allow_other`` compared
    after a warning: its ratios and "parity" would compare two different models."""
    from sdrt.export.checkpoint import Checkpoint

    if not (Path(reference) / "model_index.json").is_file():
        raise UserError(f"--reference {reference!r}: not a diffusers checkpoint (model_index.json missing)")
    recorded = manifest.data.get("source", {}).get("config_sha256")
    if recorded and Checkpoint.open(reference, allow_pickle=True).config_sha256() == recorded:
        return True
    why = (f"its configs differ from those {manifest.engine_dir} was exported from (sdrt.json source.config_sha256)"
           if recorded else f"{manifest.engine_dir}'s manifest records no source.config_sha256 to compare")
    if not allow_other:
        raise UserError(f"--reference {reference!r}: {why}; re-export from it, or pass --allow-other-reference "
                        "to compare two different models")
    warnings.warn(f"--reference {reference!r}: {why}; comparing anyway (--allow-other-reference)", SdrtWarning,
                  stacklevel=2)
    return False


def run_bench(engine_dir: str, reference: str | None, settings: Settings, progress: bool = True,
              outputs: dict | None = None, allow_other_reference: bool = False) -> dict:
    """Run the benchmark; settings, ``outputs`` ({"json", "markdown", "plot"} -> path) and the reference are
    checked before any work (``allow_other_reference``: see :func:`check_reference`)."""
    outputs = outputs or {}
    manifest = Manifest.load(engine_dir)
    s = settings
    s.height = s.height or manifest.model.default_height
    s.width = s.width or manifest.model.default_width
    _check(manifest, s, outputs)
    same_model = check_reference(manifest, reference, allow_other_reference) if reference is not None else None
    gen = {"prompt": s.prompt, "negative_prompt": s.negative_prompt, "steps": s.steps, "guidance": s.guidance,
           "seed": s.seed, "scheduler": s.scheduler, "height": s.height, "width": s.width, "batch": s.batch}
    workers: dict[str, Worker] = {}
    from tqdm import tqdm

    sides = 1 + (reference is not None) + (s.compare_mode is not None)
    total = 2 + (s.warmup + s.runs) * sides + (3 if reference else 0)
    bar = tqdm(total=total, desc="bench", file=sys.stderr, disable=not progress, leave=False)
    scratch = Path(tempfile.mkdtemp(prefix="sdrt-bench-"))
    try:
        threads = ["--threads", str(s.threads)] if s.threads else []
        threads += [arg for e in s.embeddings for arg in ("--embedding", str(e))]
        bar.set_postfix_str("loading sdrt")
        workers["sdrt"] = Worker("sdrt", ["sdrt", str(engine_dir), "--backend", s.backend, "--mode", s.mode,
                                          *threads], scratch)
        if s.compare_mode is not None:
            workers[f"sdrt:{s.compare_mode}"] = Worker(
                "sdrt-compare", ["sdrt", str(engine_dir), "--backend", s.backend, "--mode", s.compare_mode,
                                 *threads], scratch)
        bar.update(1)
        if reference:
            bar.set_postfix_str("loading diffusers")
            workers["diffusers"] = Worker(
                "diffusers", ["diffusers", str(reference), "--device", s.reference_device, *threads], scratch)
        bar.update(1)
        timings = {name: [] for name in workers}
        recorded: dict[str, dict] = {}
        schedule = [("warmup", i) for i in range(s.warmup)] + [("run", i) for i in range(s.runs)]
        for kind, i in schedule:
            # alternate which side goes first, so neither always runs on a warmer machine
            order = list(workers) if i % 2 == 0 else list(workers)[::-1]
            for name in order:
                record = not recorded.get(name)
                bar.set_postfix_str(f"{kind} {i + 1}: {name}")
                r = workers[name].ask(cmd="generate", settings=gen, record=record, tag=f"{name}-{kind}{i}")
                if record:
                    recorded[name] = r
                if kind == "run":
                    timings[name].append(r["timings"])
                bar.update(1)
        parity = None
        if reference:
            parity = {}
            inputs = _component_inputs(manifest, s.height, s.width, s.seed)
            for comp, feeds in inputs.items():
                bar.set_postfix_str(f"parity: {comp}")
                paths = {}
                for k, v in feeds.items():
                    paths[k] = str(scratch / f"in-{comp}-{k}.npy")
                    np.save(paths[k], v)
                outs = {n: workers[n].ask(cmd="component", name=comp, inputs=paths, tag=f"parity-{n}")["outputs"]
                        for n in ("sdrt", "diffusers")}
                key = next(iter(outs["sdrt"]))
                a, b = np.load(outs["sdrt"][key]), np.load(outs["diffusers"][key])
                parity[comp] = {"rel_l2": rel_l2(a, b), "max_abs": float(np.max(np.abs(a.astype(np.float64) - b)))}
                bar.update(1)
            from sdrt.runtime.images import images_psnr

            img_a, img_b = np.load(recorded["sdrt"]["image"]), np.load(recorded["diffusers"]["image"])
            psnr = float(min(images_psnr(x, y) for x, y in zip(img_a, img_b)))
            # identical images have infinite PSNR, which strict JSON cannot hold: recorded as null
            parity["image_psnr_db"] = psnr if np.isfinite(psnr) else None
            parity["images_identical"] = not np.isfinite(psnr)
            lat_a, lat_b = np.load(recorded["sdrt"]["latents"]), np.load(recorded["diffusers"]["latents"])
            parity["latent_rel_l2_per_step"] = [rel_l2(x, y) for x, y in zip(lat_a, lat_b)]
        runs = []
        for name, w in workers.items():
            stats = w.ask(cmd="stats")
            ts = timings[name]
            e2e = percentiles([t["end_to_end_s"] for t in ts])
            runs.append({
                "name": name, "backend": w.hello["backend"], "mode": w.hello.get("mode"), "load_s": w.hello["load_s"],
                "images_per_s": s.batch / e2e["p50"], "peak_rss_mb": stats["peak_rss_mb"],
                "unet_calls": len(ts[0]["unet_step_ms"]),  # per image: more than the steps for pndm and heun
                "gpu_peak_mb": stats["gpu_peak_mb"],
                "text_encoder_ms": percentiles([t["text_encoder_ms"] for t in ts]),
                "unet_step_ms": percentiles([x for t in ts for x in t["unet_step_ms"]]),
                "vae_decode_ms": percentiles([t["vae_decode_ms"] for t in ts]),
                "end_to_end_s": e2e,
            })
        by_name = {r["name"]: r for r in runs}
        ratio = _ratios(by_name["sdrt"], by_name["diffusers"]) if reference else None
        if s.compare_mode is not None:  # the second mode against the first, and against diffusers
            second = by_name[f"sdrt:{s.compare_mode}"]
            ratio = dict(ratio or {}, compare_mode=_ratios(second, by_name["sdrt"]),
                         **({"compare_mode_vs_diffusers": _ratios(second, by_name["diffusers"])} if reference else {}))
        settings_out = asdict(s)
        settings_out.update(engine_dir=str(engine_dir), reference=reference, reference_is_source=same_model)
        return {"environment": _environment(s.threads), "settings": settings_out, "runs": runs, "ratio": ratio,
                "parity": parity}
    except BaseException:
        # failed, Ctrl-C or SIGTERM: a worker may be mid-run for minutes; end it before removing its folder
        for w in workers.values():
            w.close(kill=True)
        raise
    finally:
        bar.close()
        for w in workers.values():
            w.close()
        shutil.rmtree(scratch, ignore_errors=True)
