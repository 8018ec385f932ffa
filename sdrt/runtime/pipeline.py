"""txt2img and img2img on an engine directory, with the scheduler loop in numpy.

Equal to diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline for the same seed: the same
random draws in the same order (sdrt.runtime.rng), the same schedules (sdrt.runtime.schedulers), the same
guidance arithmetic. One Pipeline serves many threads at once: per-call state lives in the call.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from sdrt.errors import StageError, UserError
from sdrt.runtime.backends import Backend, get_backend
from sdrt.runtime.lora import check_components, load_loras, lora_initializers
from sdrt.runtime.manifest import Manifest
from sdrt.runtime.rng import TorchCPUGenerator
from sdrt.runtime.schedulers import Scheduler, make_scheduler
from sdrt.runtime.tokenizer import CLIPTokenizer

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
DEFAULT_STRENGTH = 0.8
MAX_SEED = 2**64 - 1
LORA_COMPONENTS = ("text_encoder", "unet")  # the components a LoRA may patch in this pipeline


@dataclass
class Request:
    """One generation's settings, checked against the model (``Pipeline.request`` builds and checks it)."""

    prompts: list[str]
    negative_prompts: list[str]
    steps: int
    guidance: float
    seed: int
    scheduler: str
    height: int
    width: int
    num_images: int
    init_image: np.ndarray | None = None   # [1, 3, H, W] float32 in [-1, 1]
    strength: float = 1.0
    schedule: Scheduler | None = field(default=None, repr=False, compare=False)  # built and checked by request()

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images

    @property
    def guided(self) -> bool:
        # diffusers: classifier-free guidance only when guidance_scale > 1
        return self.guidance > 1.0


@dataclass
class Step:
    """Yielded after each denoising step: the latents, for progress bars and previews."""

    index: int          # 0-based, counting only the steps this call runs
    total: int
    timestep: float
    latents: np.ndarray


@dataclass
class Result:
    images: list[np.ndarray]                # each [H, W, 3] uint8
    request: Request
    latents: np.ndarray                     # final latents before decoding (scaled, as the UNet sees them)
    timings: dict = field(default_factory=dict)  # text_encoder_ms, unet_step_ms (list), vae_encode_ms, vae_decode_ms, total_s


class Denoising:
    """One request's denoising loop, a step at a time: ``unet_inputs()``, run the UNet, ``advance(out)``.

    It holds the per-call state (scheduler state, generator, latents, text embeddings) and nothing of the
    Pipeline, so a caller may run the UNet on the inputs of several requests concatenated along the batch
    axis (every input's first axis is the batch) and hand each its own slice of the output: this is what the
    serving engine does. Each request keeps its own scheduler, guidance and random draws, so its result does
    not depend on what it was batched with.
    """

    def __init__(self, req: Request, sched: Scheduler, state, rng: TorchCPUGenerator, latents: np.ndarray,
                 context: np.ndarray, begin: int):
        self.req = req
        self.sched = sched
        self.state = state
        self.rng = rng
        self.latents = latents
        self.context = context
        self.begin = begin
        self.index = begin  # the next index into sched.timesteps

    @property
    def total(self) -> int:
        """UNet calls this request makes (len(timesteps) - begin: heun and pndm make more than ``steps``)."""
        return len(self.sched.timesteps) - self.begin

    @property
    def completed(self) -> int:
        return self.index - self.begin

    @property
    def done(self) -> bool:
        return self.index >= len(self.sched.timesteps)

    @property
    def unet_batch(self) -> int:
        """Samples this request adds to a UNet call (twice its images when guided)."""
        return self.req.batch * (2 if self.req.guided else 1)

    def unet_inputs(self) -> dict[str, np.ndarray]:
        x = self.sched.scale_model_input(self.latents, self.index).astype(np.float32)
        x = np.concatenate([x, x]) if self.req.guided else x
        t = np.full((x.shape[0],), self.sched.timesteps[self.index], dtype=np.float32)
        return {"sample": x, "timestep": t, "encoder_hidden_states": self.context}

    def advance(self, out_sample: np.ndarray) -> Step:
        """Take this request's UNet output (``unet_batch`` samples) and step its scheduler."""
        k, i = self.completed, self.index
        _check_finite("unet", out_sample, f" at step {k + 1} of {self.total}")
        req = self.req
        if req.guided:
            eps_uncond, eps_text = out_sample[: req.batch], out_sample[req.batch:]
            out_sample = eps_uncond + np.float32(req.guidance) * (eps_text - eps_uncond)
        self.latents = self.sched.step(self.state, i, out_sample, self.latents, self.rng).astype(np.float32, copy=False)
        self.index += 1
        return Step(k, self.total, float(self.sched.timesteps[i]), self.latents)


def _check_finite(stage: str, array: np.ndarray, detail: str = "") -> None:
    if not np.isfinite(array).all():
        raise StageError(f"{stage} produced NaN or inf{detail}; the engine or its precision is broken for these inputs")


class Pipeline:
    """Load an engine directory once; call :meth:`generate` (or iterate :meth:`steps`) from any thread."""

    def __init__(self, engine_dir: str | os.PathLike, backend: str | Backend = "cpu", verify: str = "size",
                 backend_options: dict | None = None, load_encoder: bool = False, loras: Sequence = ()):
        """``load_encoder``: load the VAE encoder now; otherwise on the first img2img call.

        ``loras``: LoRA files applied at load, each ``"FILE[:SCALE]"`` or ``(file, scale)``: their deltas are
        added to the exported weights in numpy and the sessions load with those (sdrt.runtime.lora); nothing
        is re-exported. Another set of LoRAs is another Pipeline.
        """
        self.manifest = Manifest.load(engine_dir, verify=verify)
        self.engine_dir = Path(engine_dir)
        self.model = self.manifest.model
        self.backend = get_backend(backend, **(backend_options or {}))
        self.tokenizer = CLIPTokenizer.from_dir(
            self.engine_dir / "tokenizer", max_length=self.model.text_max_length, pad_token_id=self.model.pad_token_id)
        sched_path = self.engine_dir / "scheduler" / "scheduler_config.json"
        try:
            self.scheduler_config = json.loads(sched_path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{sched_path}: unreadable scheduler config ({e})") from None
        self.sessions = {}
        self._encoder_lock = threading.Lock()
        self.loras = load_loras(loras)
        check_components(self.loras, LORA_COMPONENTS, str(self.engine_dir))
        wanted = ["text_encoder", "unet", "vae_decoder"]
        if load_encoder and self.manifest.has("vae_encoder"):
            wanted.append("vae_encoder")
        try:
            for comp in wanted:
                self.sessions[comp] = self._load(comp)
        except BaseException:
            self.close()  # a later component failed: release what was loaded, so a reloading service leaks nothing
            raise

    # ---- requests -------------------------------------------------------------------------------------
    def request(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, seed: int | None = None,
                scheduler: str | None = None, height: int | None = None, width: int | None = None,
                num_images: int = 1, init_image: np.ndarray | None = None,
                strength: float = DEFAULT_STRENGTH) -> Request:
        """Check every setting against the model; defaults as in diffusers."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise UserError("prompt must be a string or a non-empty list of strings")
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise UserError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one per prompt")
        if not isinstance(steps, (int, np.integer)) or steps < 1:
            raise UserError(f"steps {steps!r}: must be an integer >= 1")
        if not np.isfinite(guidance) or guidance < 0:
            raise UserError(f"guidance {guidance!r}: must be a number >= 0")
        if not isinstance(num_images, (int, np.integer)) or num_images < 1:
            raise UserError(f"number of images {num_images!r}: must be an integer >= 1")
        if seed is None:
            seed = secrets.randbits(63)
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
            raise UserError(f"seed {seed!r}: must be an integer in [0, 2**64)")
        name = scheduler
        m = self.model
        if init_image is not None:
            shape = getattr(init_image, "shape", None)
            if (not isinstance(init_image, np.ndarray) or init_image.ndim != 4 or shape[0] != 1
                    or shape[1] != m.image_channels or init_image.dtype.kind != "f"):
                raise UserError(
                    f"init image of shape {shape} and dtype {getattr(init_image, 'dtype', None)}: expected float "
                    f"[1, {m.image_channels}, H, W] in [-1, 1] (sdrt.runtime.images.load_init_image makes one)")
            if not 0 < strength <= 1:
                raise UserError(f"strength {strength!r}: must be in (0, 1]")
            img_h, img_w = init_image.shape[-2:]
            height = img_h if height is None else height
            width = img_w if width is None else width
            if (height, width) != (img_h, img_w):
                raise UserError(
                    f"init image is {img_w}x{img_h} but {width}x{height} was asked; resize it when loading")
        else:
            strength = 1.0
            height = m.default_height if height is None else height
            width = m.default_width if width is None else width
        for what, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v <= 0 or v % m.size_multiple:
                raise UserError(
                    f"{what} {v!r}: must be a positive multiple of {m.size_multiple} for this model "
                    f"(its VAE scale factor)")
        # validates the name (or the config's own class) and the step count
        sched = make_scheduler(name, self.scheduler_config, int(steps))
        if init_image is not None:
            sched.begin_index(strength)  # refuses a strength that leaves no step to run
        return Request(prompts, negatives, int(steps), float(guidance), int(seed), name or "", int(height),
                       int(width), int(num_images), init_image, float(strength), sched)

    # ---- stages ---------------------------------------------------------------------------------------
    def text_inputs(self, req: Request) -> list[str]:
        """The prompts the text encoder reads for ``req``: positives, then negatives when guided."""
        return req.prompts + (req.negative_prompts if req.guided else [])

    def encode_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        ids = self.tokenizer.encode(list(prompts))
        out = self.sessions["text_encoder"].run({"input_ids": ids})["last_hidden_state"]
        _check_finite("text_encoder", out)
        return out

    def _vae_encoder(self):
        if "vae_encoder" not in self.sessions:
            if not self.manifest.has("vae_encoder"):
                raise UserError(f"{self.engine_dir} has no vae_encoder; img2img needs it (re-export with it)")
            with self._encoder_lock:
                if "vae_encoder" not in self.sessions:
                    self.sessions["vae_encoder"] = self._load("vae_encoder")
        return self.sessions["vae_encoder"]

    def _load(self, component: str):
        """One session; with LoRAs, over the patched initializers (made here, handed to the backend)."""
        patched = lora_initializers(self.manifest, component, self.loras) if self.loras else {}
        if not patched:
            return self.backend.load(self.manifest, component)
        try:
            return self.backend.load(self.manifest, component, initializers=patched)
        finally:
            patched.clear()  # the session keeps what it needs

    def encode_image(self, image: np.ndarray, rng: TorchCPUGenerator) -> np.ndarray:
        """Image [1,3,H,W] in [-1,1] -> scaled latents, sampling the VAE posterior as diffusers does."""
        params = self._vae_encoder().run({"sample": image.astype(np.float32)})["latent_parameters"]
        _check_finite("vae_encoder", params)
        mean, logvar = np.split(params, 2, axis=1)
        logvar = np.clip(logvar, -30.0, 20.0)
        std = np.exp(0.5 * logvar)
        sample = mean + std * rng.randn(mean.shape)
        shift = self.model.shift_factor or 0.0
        return ((sample - shift) * self.model.scaling_factor).astype(np.float32)

    def vae_decode(self, latents: np.ndarray) -> np.ndarray:
        """Scaled latents -> the VAE's float output [n, C, H, W] in about [-1, 1], unchecked."""
        shift = self.model.shift_factor or 0.0
        z = (latents / self.model.scaling_factor + shift).astype(np.float32)
        return self.sessions["vae_decoder"].run({"latent_sample": z})["sample"]

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        """Scaled latents -> images [n, H, W, 3] uint8."""
        from sdrt.runtime.images import decode_to_uint8

        sample = self.vae_decode(latents)
        _check_finite("vae_decoder", sample)
        return decode_to_uint8(sample)

    # ---- the loop ---------------------------------------------------------------------------------------
    def start(self, req: Request, texts: np.ndarray | None = None, timings: dict | None = None) -> "Denoising":
        """Everything before the first UNet call: text embeddings (``texts``, encoded here unless the caller
        batched them: ``encode_prompts(text_inputs(req))``), the initial latents and the scheduler state."""
        timings = {} if timings is None else timings
        m = self.model
        rng = TorchCPUGenerator(req.seed)
        sched = req.schedule or make_scheduler(req.scheduler or None, self.scheduler_config, req.steps)
        begin = sched.begin_index(req.strength) if req.init_image is not None else 0

        if texts is None:
            t0 = time.perf_counter()
            texts = self.encode_prompts(self.text_inputs(req))
            timings["text_encoder_ms"] = (time.perf_counter() - t0) * 1e3
        n = len(req.prompts)
        cond = np.repeat(texts[:n], req.num_images, axis=0)
        if req.guided:
            uncond = np.repeat(texts[n:], req.num_images, axis=0)
            context = np.concatenate([uncond, cond])  # diffusers: [negative, positive]
        else:
            context = cond

        shape = (req.batch, m.latent_channels, req.height // m.vae_scale_factor, req.width // m.vae_scale_factor)
        if req.init_image is None:
            latents = (rng.randn(shape) * np.float32(sched.init_noise_sigma)).astype(np.float32)
        else:
            t0 = time.perf_counter()
            init = self.encode_image(req.init_image, rng)
            timings["vae_encode_ms"] = (time.perf_counter() - t0) * 1e3
            init = np.concatenate([init] * req.batch) if req.batch > 1 else init
            noise = rng.randn(init.shape)
            latents = sched.add_noise(init, noise, begin).astype(np.float32)
        return Denoising(req, sched, sched.init_state(begin), rng, latents, context, begin)

    def steps(self, req: Request, timings: dict | None = None) -> Iterator[Step]:
        """Run the denoising loop, yielding after every step; the final latents are in the last Step."""
        timings = {} if timings is None else timings
        loop = self.start(req, timings=timings)
        unet = self.sessions["unet"]
        step_ms = timings.setdefault("unet_step_ms", [])
        while not loop.done:
            t0 = time.perf_counter()
            out = unet.run(loop.unet_inputs())["out_sample"]
            step = loop.advance(out)
            step_ms.append((time.perf_counter() - t0) * 1e3)
            yield step

    def generate(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 callback: Callable[[Step], None] | None = None, **settings) -> Result:
        """Generate images; ``settings`` as :meth:`request`. ``callback`` sees every Step."""
        req = self.request(prompt, negative_prompt, **settings)
        return self.run(req, callback=callback)

    def run(self, req: Request, callback: Callable[[Step], None] | None = None) -> Result:
        timings: dict = {}
        t_start = time.perf_counter()
        latents = None
        for step in self.steps(req, timings):
            latents = step.latents
            if callback is not None:
                callback(step)
        t0 = time.perf_counter()
        images = self.decode_latents(latents)
        timings["vae_decode_ms"] = (time.perf_counter() - t0) * 1e3
        timings["total_s"] = time.perf_counter() - t_start
        return Result(list(images), req, latents, timings)

    def close(self) -> None:
        for s in self.sessions.values():
            s.close()
        self.sessions.clear()

