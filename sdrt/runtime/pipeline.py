"""txt2img and img2img on an engine directory, with the scheduler loop in numpy.

Equal to diffusers for the same seed - StableDiffusionPipeline / StableDiffusionImg2ImgPipeline (SD1.x, SD2.x,
SD-Turbo; an LCM-distilled UNet as LatentConsistencyModelPipeline runs it), StableDiffusionXLPipeline /
StableDiffusionXLImg2ImgPipeline (SDXL base, refiner, SDXL-Turbo): the same random draws in the same order
(sdrt.runtime.rng), the same schedules (sdrt.runtime.schedulers), the same conditioning and guidance
arithmetic. One Pipeline serves many threads at once: per-call state lives in the call.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from sdrt.errors import SdrtWarning, UserError
from sdrt.runtime.backends import Backend, get_backend
from sdrt.runtime.control import CONTROL_IMAGE, CONTROLNET, CONTROLNETS, T2I_ADAPTER, check_fits
from sdrt.runtime.denoising import Control, Denoising, Inpainting, Step, evaluate_unet, guidance_embedding, rescale_guided  # noqa: F401
from sdrt.runtime.families import PromptEmbeddings, check_finite, family_of, text_inputs  # noqa: F401
from sdrt.runtime.lora import check_components, load_loras, lora_initializers
from sdrt.runtime.manifest import TINY_VAE, Manifest
from sdrt.runtime.modes import unoffered
from sdrt.runtime.precision import check_precision
from sdrt.runtime.prompts import PromptTokens
from sdrt.runtime.requests import Request, Result, make_request  # noqa: F401 - importable from here as before
from sdrt.runtime.rng import TorchCPUGenerator
from sdrt.runtime.schedulers import Scheduler, make_scheduler
from sdrt.runtime.settings import (  # noqa: F401 - the defaults, importable from here as before
    DEFAULT_AESTHETIC_SCORE, DEFAULT_GUIDANCE, DEFAULT_NEGATIVE_AESTHETIC_SCORE, DEFAULT_STEPS, DEFAULT_STRENGTH,
    MAX_SEED,
)
from sdrt.runtime.settings import shown as _shown

if TYPE_CHECKING:
    from PIL import Image

VAES = ("full", "tiny")   # which VAE decoder makes the final images (tiny: `sdrt export --tiny-vae`)

logger = logging.getLogger(__name__)
LORA_COMPONENTS = ("text_encoder", "text_encoder_2", "unet")  # the components a LoRA may patch


def _integer(what: str, value, low: int, high: int | None = None, allowed: str | None = None) -> int:
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low
            or (high is not None and value > high)):
        raise UserError(f"{what} {_shown(value)}: must be an integer {allowed or f'>= {low}'}")
    return int(value)




class Pipeline:
    """Load an engine directory once; call :meth:`generate` (or iterate :meth:`steps`) from any thread."""

    def __init__(self, engine_dir: str | os.PathLike, backend: str | Backend = "cpu", verify: str = "size",
                 backend_options: dict | None = None, load_encoder: bool = False,
                 embeddings: Sequence[str | os.PathLike] = (), loras: Sequence = (), precision: str = "fp32",
                 cache_interval: int | None = None, vae: str = "full"):
        """``load_encoder``: load the VAE encoder now; otherwise on the first img2img call.
        ``embeddings``: textual-inversion files, ``FILE[:TOKEN]`` (sdrt.runtime.embeddings).
        ``precision``: "fp32" or "bf16" (sdrt.runtime.precision: the openvino backend, on a CPU with bf16
        arithmetic). ``cache_interval`` N: feature caching across steps, a full UNet evaluation every N and the
        shallow UNet on the cached deep feature between (needs the pair, `sdrt export --cache-branch`); None:
        the plain UNet. ``vae``: "full" or "tiny" (the AutoencoderTiny decoder, `sdrt export --tiny-vae`),
        for the final images; previews use the tiny one whenever the engine has it.

        ``loras``: LoRA files applied at load, each ``"FILE[:SCALE]"`` or ``(file, scale)``: their deltas are
        added to the exported weights in numpy and the sessions load with those (sdrt.runtime.lora); nothing
        is re-exported. Another set of LoRAs is another Pipeline.
        """
        if backend_options is not None and not isinstance(backend_options, dict):
            raise UserError(f"backend_options {_shown(backend_options)}: must be a dict of the backend's options")
        if vae not in VAES:
            raise UserError(f"vae {_shown(vae)}: choose one of {', '.join(VAES)}")
        if cache_interval is not None:
            cache_interval = _integer("cache_interval", cache_interval, 1)
        self.manifest = Manifest.load(engine_dir, verify=verify)
        self.engine_dir = Path(engine_dir)
        self.model = self.manifest.model
        self.precision = check_precision(precision, getattr(backend, "name", backend))  # a bad backend: below
        if isinstance(backend, str):
            if self.precision != "fp32":
                backend_options = {**(backend_options or {}), "precision": self.precision}
        elif getattr(backend, "precision", "fp32") != self.precision:
            raise UserError(f"precision {precision!r}: the given backend runs {getattr(backend, 'precision', 'fp32')}")
        self.cache_interval = cache_interval
        self.feature_cache = self.manifest.data.get("feature_cache") if cache_interval is not None else None
        if cache_interval is not None and not self.feature_cache:
            raise UserError(f"cache_interval {cache_interval}: {self.engine_dir} has no feature-caching pair; "
                            "re-export with `sdrt export --cache-branch B`")
        if vae == "tiny" and not self.manifest.has(TINY_VAE):
            raise UserError(f"vae 'tiny': {self.engine_dir} has no tiny VAE decoder; re-export with "
                            "`sdrt export --tiny-vae DIR`")
        if unoffered(cache_interval, vae):
            warnings.warn(unoffered(cache_interval, vae), SdrtWarning, stacklevel=2)
        self.vae = vae
        self.backend = get_backend(backend, **(backend_options or {}))
        self.family = family_of(self.model)
        self.tokenizers, self.prompt_reader, self._initializers, self.embeddings = self.family.load_text(
            self.engine_dir, embeddings, self.manifest)
        self.tokenizer = next(iter(self.tokenizers.values()))
        sched_path = self.engine_dir / "scheduler" / "scheduler_config.json"
        try:
            self.scheduler_config = json.loads(sched_path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{sched_path}: unreadable scheduler config ({e})") from None
        self.sessions = {}
        self._encoder_lock = threading.Lock()
        # ControlNets and T2I-Adapters (`sdrt export --controlnet`): their manifest records by name (component,
        # kind, the UNet graph taking their residuals), each checked against that graph; loaded on first use
        self.controlnets: dict[str, dict] = dict(self.manifest.data.get(CONTROLNETS) or {})
        for name, record in self.controlnets.items():
            check_fits(name, record, self.manifest.data["components"].get(record.get("unet"), {}))
        self.loras = load_loras(loras)
        check_components(self.loras, [c for c in LORA_COMPONENTS if self.manifest.has(c)], str(self.engine_dir))
        if self.loras and self.feature_cache and any("unet" in lora.components for lora, _ in self.loras):
            raise UserError("--lora with --cache-interval: run-time LoRAs do not reach the feature-caching UNet pair "
                            "yet; fuse the LoRA at export (sdrt export --lora FILE --cache-branch B)")
        unets = [self.feature_cache["deep"], self.feature_cache["shallow"]] if self.feature_cache else ["unet"]
        self.unet_component = unets[0]   # the one whose inputs say what the UNet takes
        wanted = [*self.family.text_components(), *unets, TINY_VAE if vae == "tiny" else "vae_decoder"]
        if vae != "tiny" and self.manifest.has(TINY_VAE):
            wanted.append(TINY_VAE)  # for previews
        if load_encoder and self.manifest.has("vae_encoder"):
            wanted.append("vae_encoder")
        try:
            for comp in wanted:
                self.sessions[comp] = self._load(comp)
        except BaseException:
            self.close()  # a later component failed: release what was loaded, so a reloading service leaks nothing
            raise
        self.max_prompt_chunks, self._prompt_limit = self._chunk_limit()
        sample = next(s for s in self.sessions[self.unet_component].inputs if s.name == "sample")
        # the UNet's input channels: the latents', or a 9-channel inpainting UNet's latents, mask and masked image
        self.unet_in_channels = sample.shape[1] if isinstance(sample.shape[1], int) else self.model.latent_channels
        # the most samples one UNet call takes on this backend (a TensorRT plan's profile), or None: any
        limits = [n for n in (self.sessions[c].dim_limit("sample", 0) for c in unets) if n is not None]
        self.unet_batch_limit: int | None = min(limits) if limits else None

    def _load(self, component: str):
        """One session; with LoRAs or embeddings, over the replaced initializers (made here, handed to the
        backend): the LoRAs' patched weights and the token-embedding table with the embeddings' rows."""
        patched = lora_initializers(self.manifest, component, self.loras) if self.loras else {}
        patched.update(self._initializers.get(component, {}))
        if not patched:
            return self.backend.load(self.manifest, component)
        try:
            return self.backend.load(self.manifest, component, initializers=patched)
        finally:
            patched.clear()  # the session keeps what it needs

    def _chunk_limit(self) -> tuple[int | None, str]:
        """How many prompt chunks the UNet takes (None: any number), and why no more."""
        unet = self.sessions[self.unet_component]
        length = self.model.text_max_length
        tokens = unet.dim_limit("encoder_hidden_states", 1)
        if tokens is None:
            return None, ""
        spec = next(s for s in unet.inputs if s.name == "encoder_hidden_states")
        if isinstance(spec.shape[1], int):
            return max(1, tokens // length), (f"its UNet was exported for {tokens} tokens, before long prompts; "
                                              f"re-export it")
        return max(1, tokens // length), f"its {self.backend.name} profiles; rebuild with a larger --prompt-chunks"

    # ---- requests -------------------------------------------------------------------------------------
    def request(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, seed: int | None = None,
                scheduler: str | None = None, height: int | None = None, width: int | None = None,
                num_images: int = 1, init_image: str | os.PathLike | np.ndarray | Image.Image | None = None,
                strength: float | None = None, truncate: bool = False, weighting: bool = True,
                original_size: tuple[int, int] | None = None, crop: tuple[int, int] = (0, 0),
                target_size: tuple[int, int] | None = None, aesthetic_score: float = DEFAULT_AESTHETIC_SCORE,
                negative_aesthetic_score: float = DEFAULT_NEGATIVE_AESTHETIC_SCORE,
                guidance_rescale: float = 0.0, prompt_2: str | Sequence[str] | None = None,
                negative_prompt_2: str | Sequence[str] | None = None, denoising_end: float | None = None,
                denoising_start: float | None = None, init_latents: np.ndarray | None = None,
                mask: str | os.PathLike | np.ndarray | Image.Image | None = None, mask_blur: int = 0,
                mask_invert: bool = False, masked_content: str = "original", inpaint_area: str = "whole",
                inpaint_padding: int = 32, overlay: bool = False, outpaint: str | Sequence[int] | None = None,
                noise_multiplier: float = 1.0, controls: Sequence | None = None, guess_mode: bool = False) -> Request:
        """Check every setting against the model; defaults as in diffusers. A bad one is a UserError naming it.

        ``init_image`` (img2img): a path or a PIL image, prepared as ``sdrt.runtime.images.load_init_image``
        prepares it (``height``/``width`` resize it), or that function's result, a float ``[1, C, H, W]`` array
        in [-1, 1] (``height``/``width`` must then match it). ``strength``: img2img only, default 0.8.
        A prompt over 75 tokens is read in chunks (``truncate``: cut as diffusers does) and weighted
        (``weighting``; sdrt.runtime.prompts; SD1/SD2).

        SDXL only: ``original_size``/``target_size`` (height, width) and ``crop`` (top, left) in pixels, the
        size and crop conditioning (default: the output size, no crop); the refiner's ``aesthetic_score`` and
        ``negative_aesthetic_score``. An SDXL model without a negative prompt conditions its unguided half on
        zeros when its checkpoint says ``force_zeros_for_empty_prompt`` (an empty string is encoded).

        ``guidance_rescale`` in [0, 1]: diffusers' rescale of the guided prediction to the text-conditioned one's
        standard deviation (against over-exposure, for v-prediction and zero-terminal-SNR models; 0: off). It
        acts only on guided steps (guidance > 1); otherwise it is ignored with a warning, as diffusers ignores it.

        SDXL base: ``prompt_2`` / ``negative_prompt_2``, what the second text encoder (OpenCLIP bigG) reads instead
        of ``prompt`` / ``negative_prompt`` (default, or an empty string: the same), as in diffusers. As there,
        ``negative_prompt_2`` without ``negative_prompt`` on a force_zeros_for_empty_prompt checkpoint still
        conditions on zeros, and the refiner's one encoder reads ``prompt``: both are warned about.

        SDXL's base + refiner handoff, as diffusers' SDXL pipelines: ``denoising_end`` in (0, 1) stops the base
        that far through the schedule (its ``Result.latents`` are then still noisy); the refiner, given them as
        ``init_latents`` (``[1 or batch, C, H/f, W/f]``, scaled as the UNet sees them) and ``denoising_start``
        at the same fraction, runs the rest of the same schedule without adding noise (``strength`` is then
        ignored, as there). ``init_latents`` without ``denoising_start`` is img2img from latents at ``strength``.

        Inpainting (sdrt.runtime.masks), as diffusers' StableDiffusion(XL)InpaintPipeline: ``mask`` (a path, a PIL
        image or an array; white is repainted) with ``init_image``; a 9-channel inpainting UNet reads the mask and
        the masked picture, a 4-channel one has the init picture blended back outside the mask after every step.
        ``strength`` then defaults to the family's (1.0; SDXL 0.9999, as diffusers). The output size defaults to
        the picture's. AUTOMATIC1111's options: ``mask_blur`` (pixels), ``mask_invert``, ``masked_content``
        (original, fill, latent-noise, latent-nothing), ``inpaint_area`` ("masked": a box around the mask, padded
        by ``inpaint_padding`` pixels, processed at the output size, default the model's, and pasted back, as
        diffusers' ``padding_mask_crop``), ``overlay`` (the original pasted back outside the mask). ``outpaint``
        ``"LEFT,RIGHT,TOP,BOTTOM"`` extends the canvas by that many pixels and paints the new border.
        ``mask_blur`` may be an (x, y) pair. ``noise_multiplier`` (img2img, inpainting): AUTOMATIC1111's initial
        noise multiplier, the noise added to the init latents scaled by it (1: as diffusers).

        ControlNets (sdrt.runtime.control), as diffusers' StableDiffusionControlNetPipeline with a
        MultiControlNetModel: ``controls``, each ``"NAME:IMAGE[:SCALE[:START:END]]"``, a dict with those keys or a
        tuple; their residuals scaled, kept to their window of the schedule and summed. ``guess_mode``: they see
        only the conditional half, residuals scaled 0.1 to 1.0 by depth.
        """
        return make_request(self, prompt, negative_prompt, steps=steps, guidance=guidance, seed=seed,
                            scheduler=scheduler, height=height, width=width, num_images=num_images,
                            init_image=init_image, strength=strength, truncate=truncate, weighting=weighting,
                            original_size=original_size, crop=crop, target_size=target_size,
                            aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score,
                            guidance_rescale=guidance_rescale, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
                            denoising_end=denoising_end, denoising_start=denoising_start, init_latents=init_latents,
                            mask=mask, mask_blur=mask_blur, mask_invert=mask_invert, masked_content=masked_content,
                            inpaint_area=inpaint_area, inpaint_padding=inpaint_padding, overlay=overlay,
                            outpaint=outpaint, noise_multiplier=noise_multiplier, controls=controls,
                            guess_mode=guess_mode)

    # ---- stages ---------------------------------------------------------------------------------------
    def text_inputs(self, req: Request, second: bool = False) -> list[str]:
        """The prompts the text encoder reads for ``req`` (sdrt.runtime.families.text_inputs)."""
        return text_inputs(req, second)

    # ---- the batch interface: several requests' prompts, UNet evaluations and decodes at once -------------
    def encode_batch(self, reqs: Sequence[Request]) -> list:
        """Each request's text embeddings, what :meth:`start` takes as ``texts``: the model family encodes them
        (SD1/SD2: one text-encoder call over every request's prompt chunks; SDXL: per request)."""
        return self.family.encode(self, reqs)

    def evaluate_unet(self, loops: Sequence[Denoising]) -> list[np.ndarray]:
        """One UNet evaluation of each of ``loops`` (requests that share a latent and context shape), batched
        within the backend's limit; each loop's ``out_sample``, for its ``advance``. With feature caching, each
        loop gets the deep UNet every ``cache_interval`` of its own evaluations and the shallow one between."""
        return evaluate_unet(self.sessions, loops, self.feature_cache, self.cache_interval, self.unet_batch_limit)

    def decode_batch(self, latents: Sequence[np.ndarray], component: str | None = None) -> list[np.ndarray]:
        """Several requests' scaled latents through one VAE decode: each one's float output [n, C, H, W],
        unchecked (the caller answers a non-finite one with an error naming the decoder)."""
        sample = self.vae_decode(np.concatenate(latents) if len(latents) > 1 else latents[0], component)
        return np.split(sample, np.cumsum([x.shape[0] for x in latents])[:-1])

    def prepare_prompts(self, req: Request) -> PromptTokens:
        """Step (a) of sdrt.runtime.prompts for ``req``'s prompts: token ids per chunk and their weights."""
        return self.prompt_reader.prepare(self.text_inputs(req), truncate=req.truncate, weighting=req.weighting,
                                          max_chunks=self.max_prompt_chunks, limit=self._prompt_limit)

    def run_text_encoder(self, ids: np.ndarray) -> np.ndarray:
        """Step (b): ``last_hidden_state`` of token-id rows (of one request, or several concatenated)."""
        session = self.sessions["text_encoder"]
        most = session.dim_limit("input_ids", 0) or len(ids)
        out = np.concatenate([session.run({"input_ids": ids[i:i + most]})["last_hidden_state"]
                              for i in range(0, len(ids), most)])
        check_finite("text_encoder", out)
        return out

    def encode_tokens(self, tokens: PromptTokens) -> np.ndarray:
        """Steps (b) and (c): text embeddings ``[n_prompts, max_length * chunks, hidden]``."""
        return tokens.assemble(self.run_text_encoder(tokens.ids))

    def encode_prompts(self, prompts: Sequence[str], truncate: bool = False, weighting: bool = True) -> np.ndarray:
        """Prompts -> text embeddings ``[n, max_length * chunks, hidden]`` (steps a, b and c)."""
        return self.encode_tokens(self.prompt_reader.prepare(
            list(prompts), truncate=truncate, weighting=weighting, max_chunks=self.max_prompt_chunks,
            limit=self._prompt_limit))

    def encode_prompts_xl(self, prompts: Sequence[str], prompts_2: Sequence[str] | None = None) -> PromptEmbeddings:
        """SDXL: each encoder reads the prompts with its own tokenizer (the second of two reads ``prompts_2``
        where given, one for each of ``prompts``); their penultimate hidden states are concatenated on the width,
        the last encoder's pooled projection is the pooled embedding."""
        if prompts_2 is not None and len(prompts_2) != len(prompts):
            raise UserError(f"prompts_2: {len(prompts_2)} for {len(prompts)} prompts; give one per prompt")
        hidden, pooled = [], None
        for i, e in enumerate(self.model.text_encoders):
            comp = e["component"]
            texts = prompts_2 if i == 1 and prompts_2 is not None else prompts
            out = self.sessions[comp].run({"input_ids": self.tokenizers[comp].encode(list(texts))})
            for name, value in out.items():
                check_finite(comp, value)
            hidden.append(out[e["output"]])
            if e.get("pooled"):
                pooled = out[e["pooled"]]
        return PromptEmbeddings(np.concatenate(hidden, axis=-1), pooled)

    def _vae_encoder(self):
        if not self.manifest.has("vae_encoder"):
            raise UserError(f"{self.engine_dir} has no vae_encoder; img2img needs it (re-export with it)")
        self._load_lazily(["vae_encoder"])
        return self.sessions["vae_encoder"]

    def encode_image(self, image: np.ndarray, rng: TorchCPUGenerator) -> np.ndarray:
        """Image [1,3,H,W] in [-1,1] -> scaled latents, sampling the VAE posterior as diffusers does."""
        params = self._vae_encoder().run({"sample": image.astype(np.float32)})["latent_parameters"]
        check_finite("vae_encoder", params)
        mean, logvar = np.split(params, 2, axis=1)
        logvar = np.clip(logvar, -30.0, 20.0)
        std = np.exp(0.5 * logvar)
        sample = mean + std * rng.randn(mean.shape)
        shift = self.model.shift_factor or 0.0
        return ((sample - shift) * self.model.scaling_factor).astype(np.float32)

    @property
    def mode(self) -> str:
        """This pipeline's mode in one word (sdrt.runtime.modes): e.g. ``fp32``, ``bf16+cache3+tiny-vae``."""
        from sdrt.runtime.modes import mode_name

        return mode_name(self.precision, self.cache_interval, self.vae)

    @property
    def vae_component(self) -> str:
        """The decoder the final images come from: vae_decoder, or vae_decoder_tiny with ``vae="tiny"``."""
        return TINY_VAE if self.vae == "tiny" else "vae_decoder"

    def vae_decode(self, latents: np.ndarray, component: str | None = None) -> np.ndarray:
        """Scaled latents -> the VAE's float output [n, C, H, W] in about [-1, 1], unchecked; each decoder
        with its own scaling and shift factors (the tiny VAE's are in its manifest entry)."""
        component = component or self.vae_component
        numbers = self.manifest.component(component) if component == TINY_VAE else {}
        scaling = numbers.get("scaling_factor", self.model.scaling_factor)
        shift = numbers.get("shift_factor", self.model.shift_factor) or 0.0
        z = (latents / scaling + shift).astype(np.float32)
        return self.sessions[component].run({"latent_sample": z})["sample"]

    def decode_latents(self, latents: np.ndarray, component: str | None = None) -> np.ndarray:
        """Scaled latents -> images [n, H, W, 3] uint8."""
        from sdrt.runtime.images import decode_to_uint8

        component = component or self.vae_component
        sample = self.vae_decode(latents, component)
        check_finite(component, sample)
        return decode_to_uint8(sample)

    @staticmethod
    def finish_images(req: Request, images) -> list[np.ndarray]:
        """A request's decoded pictures [H, W, 3] uint8, finished: an inpainting request's pasted back into its
        canvas or overlaid with it (sdrt.runtime.masks.Finish); others as they are."""
        return [req.finish(image) for image in images] if req.finish is not None else list(images)

    def decode_preview(self, latents: np.ndarray) -> np.ndarray:
        """Scaled latents -> preview images [n, H, W, 3] uint8: with the tiny VAE decoder when the engine has
        one (a fraction of the full decoder's cost), else the full one."""
        return self.decode_latents(latents, TINY_VAE if TINY_VAE in self.sessions else None)

    # ---- the loop ---------------------------------------------------------------------------------------
    def start(self, req: Request, texts: np.ndarray | PromptEmbeddings | None = None,
              timings: dict | None = None) -> "Denoising":
        """Everything before the first UNet call: text embeddings (``texts``, encoded here unless the caller
        batched them: an item of :meth:`encode_batch`), the UNet's other conditioning (the model family's), the
        initial latents and the scheduler state."""
        timings = {} if timings is None else timings
        m = self.model
        rng = TorchCPUGenerator(req.seed)
        sched = req.schedule or make_scheduler(req.scheduler or None, self.scheduler_config, req.steps)
        if req.denoising_start is not None:
            begin = sched.start_index(req.denoising_start)
        else:
            begin = sched.begin_index(req.strength) if req.img2img else 0
        end = None if req.denoising_end is None else sched.end_index(req.denoising_end, begin)

        if texts is None:
            t0 = time.perf_counter()
            texts = self.encode_batch([req])[0]
            timings["text_encoder_ms"] = (time.perf_counter() - t0) * 1e3
        context, conditioning = self.family.conditioning(req, texts)
        if m.guidance_embedding_dim:
            conditioning["timestep_cond"] = guidance_embedding(req.guidance, m.guidance_embedding_dim, req.batch)

        shape = (req.batch, m.latent_channels, req.height // m.vae_scale_factor, req.width // m.vae_scale_factor)
        inpaint = None
        if req.mask is not None:
            latents, inpaint = self._start_inpainting(req, sched, begin, rng, shape, timings)
        elif not req.img2img:
            latents = (rng.randn(shape) * np.float32(sched.init_noise_sigma)).astype(np.float32)
        else:
            if req.init_latents is not None:
                init = req.init_latents
            else:
                t0 = time.perf_counter()
                init = self.encode_image(req.init_image, rng)
                timings["vae_encode_ms"] = (time.perf_counter() - t0) * 1e3
            init = np.concatenate([init] * req.batch) if req.batch > 1 and len(init) == 1 else init
            if req.denoising_start is None:
                noise = rng.randn(init.shape) * np.float32(req.noise_multiplier)
                latents = sched.add_noise(init, noise, begin).astype(np.float32)
            else:  # the base's latents, already as noisy as the schedule is at `begin` (diffusers: add_noise=False)
                latents = init.astype(np.float32)
        controls, guess = self._controls(req)
        return Denoising(req, sched, sched.init_state(begin), rng, latents, context, begin, conditioning, end,
                         inpaint, controls, guess)

    def _controls(self, req: Request) -> tuple[list[Control], bool]:
        """The request's ControlNets with their pictures as diffusers feeds them (one per image of the batch,
        doubled for guidance unless in guess mode, where the ControlNet sees only the conditional half), its
        T2I-Adapters with their features, computed once here as diffusers' adapter pipelines do before the loop;
        and whether guess mode is on (asked, or forced as diffusers forces it by a ControlNet with
        ``global_pool_conditions``, the first one's for several)."""
        if not req.controls:
            return [], req.guess_mode
        records = [c.record for c in req.controls]
        guess = req.guess_mode or bool(records[0].get("global_pool_conditions", False))
        self._load_lazily(list(dict.fromkeys([*(r["unet"] for r in records), *(r["component"] for r in records)])))
        out = []
        for c, r in zip(req.controls, records):
            control = Control(r["component"], None, c.scale, c.start, c.end, r.get("kind", CONTROLNET), r["unet"],
                              bool(r.get("global_pool_conditions", False)))
            if control.kind == T2I_ADAPTER:
                features = self.sessions[r["component"]].run({CONTROL_IMAGE: c.image})
                for name, value in features.items():
                    check_finite(r["component"], value)
                control.features = features
            else:
                image = np.repeat(c.image, req.batch, axis=0)
                control.image = np.concatenate([image, image]) if req.guided and not guess else image
            out.append(control)
        return out, guess

    def _load_lazily(self, components) -> None:
        """Load sessions only some requests need (the VAE encoder, ControlNets) on first use, once."""
        if all(comp in self.sessions for comp in components):
            return
        with self._encoder_lock:
            for comp in components:
                if comp not in self.sessions:
                    self.sessions[comp] = self._load(comp)

    def _start_inpainting(self, req: Request, sched: Scheduler, begin: int, rng: TorchCPUGenerator, shape: tuple,
                          timings: dict) -> tuple[np.ndarray, Inpainting]:
        """The initial latents and the :class:`Inpainting` of a masked request, drawn as diffusers'
        StableDiffusion(XL)InpaintPipeline draws them: the init image's latents (when a 4-channel UNet blends
        them back, or strength < 1 starts from them), then the initial noise, then the masked image's latents
        (always drawn there, whatever the UNet). At strength 1 the latents are pure noise. AUTOMATIC1111's
        latent-noise / latent-nothing masked content replaces the init latents under the mask (its noise drawn
        right after the init image's latents)."""
        from sdrt.runtime.masks import latent_mask

        reads_mask = self.unet_in_channels != self.model.latent_channels   # a 9-channel inpainting UNet
        full = req.strength == 1.0
        t0 = time.perf_counter()

        def encode(image):
            latents = self.encode_image(image, rng)
            return np.concatenate([latents] * (req.batch // len(latents)))

        mask = latent_mask(req.mask, shape[2:])
        mask = np.concatenate([mask] * (req.batch // len(mask)))
        image_latents = encode(req.init_image) if not reads_mask or not full else None
        if image_latents is not None and req.masked_content in ("latent-noise", "latent-nothing"):
            # AUTOMATIC1111's masked content: the init latents under the mask replaced by noise, or by zeros
            fill = rng.randn(shape) if req.masked_content == "latent-noise" else np.float32(0)
            image_latents = (image_latents * (np.float32(1) - mask) + fill * mask).astype(np.float32)
        noise = rng.randn(shape) * np.float32(req.noise_multiplier)
        if full:
            latents = (noise * np.float32(sched.init_noise_sigma)).astype(np.float32)
        else:
            latents = sched.add_noise(image_latents, noise, begin).astype(np.float32)
        masked_latents = encode(req.init_image * (req.mask < 0.5))
        timings["vae_encode_ms"] = (time.perf_counter() - t0) * 1e3
        if reads_mask:
            return latents, Inpainting(mask, masked_latents=masked_latents)
        return latents, Inpainting(mask, image_latents=image_latents, noise=noise)

    def steps(self, req: Request, timings: dict | None = None) -> Iterator[Step]:
        """Run the denoising loop, yielding after every step; the final latents are in the last Step."""
        timings = {} if timings is None else timings
        loop = self.start(req, timings=timings)
        step_ms = timings.setdefault("unet_step_ms", [])
        while not loop.done:
            t0 = time.perf_counter()
            step = loop.advance(self.evaluate_unet([loop])[0])
            step_ms.append((time.perf_counter() - t0) * 1e3)
            yield step

    def generate(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 callback: Callable[[Step], None] | None = None, **settings) -> Result:
        """Generate images; ``settings`` as :meth:`request`. ``callback`` sees every Step."""
        if callback is not None and not callable(callback):
            raise UserError(f"callback {_shown(callback)}: must be a function that takes a Step, or None")
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise UserError(f"unknown setting {unknown[0]!r}; the settings are: {', '.join(SETTINGS)}")
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
        images = self.finish_images(req, self.decode_latents(latents))
        timings["vae_decode_ms"] = (time.perf_counter() - t0) * 1e3
        timings["total_s"] = time.perf_counter() - t_start
        return Result(list(images), req, latents, timings)

    def close(self) -> None:
        for s in self.sessions.values():
            s.close()
        self.sessions.clear()


# Pipeline.generate's settings: request()'s keyword-only parameters
SETTINGS = tuple(n for n, p in inspect.signature(Pipeline.request).parameters.items() if p.kind is p.KEYWORD_ONLY)
