"""The denoising loop a step at a time, and one UNet evaluation over several requests' loops.

A :class:`Denoising` holds one request's per-call state (scheduler state, generator, latents, conditioning,
the feature-caching deep feature) and nothing of the Pipeline. :func:`evaluate_unet` runs one UNet evaluation
of several loops at once, concatenated along the batch axis (every UNet input's first axis is the batch),
within the backend's batch limit, and hands each loop its own slice: ``Pipeline.steps`` calls it with one
loop, the serving engine with every request that shares the step. Each request keeps its own scheduler,
guidance and random draws, so its result does not depend on what it was batched with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from sdrt.runtime.control import CONTROLNET, UNET_CONTROL, keep, residual_scales, scaled
from sdrt.runtime.families import check_finite

if TYPE_CHECKING:
    from sdrt.runtime.rng import TorchCPUGenerator
    from sdrt.runtime.schedulers import Scheduler


@dataclass
class Step:
    """Yielded after each denoising step: the latents, for progress bars and previews."""

    index: int          # 0-based, counting only the steps this call runs
    total: int
    timestep: float
    latents: np.ndarray


@dataclass
class Inpainting:
    """What an inpainting request adds to its loop, as diffusers' inpaint pipelines do it. ``mask``: the mask at
    the latent size, [batch, 1, h, w], 1 where the picture is repainted. A 9-channel UNet reads the mask and
    ``masked_latents`` (the masked image's latents) concatenated after the latents on the channel axis; a
    4-channel UNet gets ``image_latents`` (the init image's) noised with the loop's initial ``noise`` to the
    next step's level pasted back outside the mask after every step (the original latents after the last)."""

    mask: np.ndarray
    masked_latents: np.ndarray | None = None
    image_latents: np.ndarray | None = None
    noise: np.ndarray | None = None

    @property
    def blends(self) -> bool:
        return self.image_latents is not None


@dataclass
class Control:
    """One ControlNet or T2I-Adapter on a request, as diffusers' ControlNet and adapter pipelines apply it.

    A ControlNet (``kind`` "controlnet") runs at every step in its window on ``image``, its conditioning picture
    [n, 3, H, W] in [0, 1] (the request's batch; doubled for guidance unless in guess mode), its residuals scaled
    by ``scale`` while the step is within [``start``, ``end``] of the schedule (diffusers' ``controlnet_keep``).
    A T2I-Adapter (``kind`` "t2i_adapter") ran once before the loop: ``features`` (one image's), times ``scale``
    at every step in the window. ``unet``: the UNet graph that takes what it computes."""

    component: str
    image: np.ndarray | None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    kind: str = CONTROLNET
    unet: str = UNET_CONTROL
    global_pool: bool = False
    features: dict[str, np.ndarray] | None = None

    def scale_at(self, i: int, total: int) -> float:
        """The conditioning scale at step ``i`` of ``total`` (0 outside the window)."""
        return self.scale * keep(i, total, self.start, self.end)


class Denoising:
    """One request's denoising loop, a step at a time: ``unet_inputs()``, run the UNet, ``advance(out)``."""

    def __init__(self, req, sched: "Scheduler", state, rng: "TorchCPUGenerator", latents: np.ndarray,
                 context: np.ndarray, begin: int, conditioning: dict[str, np.ndarray] | None = None,
                 end: int | None = None, inpaint: Inpainting | None = None, controls: Sequence[Control] = (),
                 guess_mode: bool = False):
        """``conditioning``: the UNet's other inputs (SDXL's text_embeds and time_ids, an LCM UNet's
        timestep_cond), each with ``unet_batch`` rows, already guidance-doubled like ``context``. The loop runs
        the scheduler's step indices ``begin`` to ``end`` (default: its last). ``inpaint``: an inpainting
        request's mask and latents (:class:`Inpainting`). ``controls``: its ControlNets (:class:`Control`);
        ``guess_mode``: they see only the conditional half, their residuals scaled 0.1 to 1.0 by depth."""
        self.req = req
        self.sched = sched
        self.state = state
        self.rng = rng
        self.latents = latents
        self.context = context
        self.conditioning = dict(conditioning or {})
        self.begin = begin
        self.end = len(sched.timesteps) if end is None else end
        self.index = begin  # the next index into sched.timesteps
        self.feature: np.ndarray | None = None  # feature caching: the deep feature of the last full evaluation
        self.inpaint = inpaint
        self.controls = list(controls)
        self.guess_mode = guess_mode
        self._unet_channels = None   # a 9-channel UNet's mask and masked-image latents, guidance-doubled
        if inpaint is not None and inpaint.masked_latents is not None:
            extra = np.concatenate([inpaint.mask, inpaint.masked_latents], axis=1).astype(np.float32)
            self._unet_channels = np.concatenate([extra, extra]) if req.guided else extra

    @property
    def total(self) -> int:
        """UNet calls this request makes (end - begin: heun and pndm make more than ``steps``)."""
        return self.end - self.begin

    @property
    def completed(self) -> int:
        return self.index - self.begin

    @property
    def done(self) -> bool:
        return self.index >= self.end

    @property
    def unet_batch(self) -> int:
        """Samples this request adds to a UNet call (twice its images when guided)."""
        return self.req.batch * (2 if self.req.guided else 1)

    def unet_inputs(self) -> dict[str, np.ndarray]:
        x = self.sched.scale_model_input(self.latents, self.index).astype(np.float32)
        x = np.concatenate([x, x]) if self.req.guided else x
        if self._unet_channels is not None:  # latents, mask, masked-image latents (diffusers' order)
            x = np.concatenate([x, self._unet_channels], axis=1)
        t = np.full((x.shape[0],), self.sched.timesteps[self.index], dtype=np.float32)
        return {"sample": x, "timestep": t, "encoder_hidden_states": self.context, **self.conditioning}

    def advance(self, out_sample: np.ndarray) -> Step:
        """Take this request's UNet output (``unet_batch`` samples) and step its scheduler."""
        k, i = self.completed, self.index
        check_finite("unet", out_sample, f" at step {k + 1} of {self.total}")
        req = self.req
        if req.guided:
            eps_uncond, eps_text = out_sample[: req.batch], out_sample[req.batch:]
            out_sample = eps_uncond + np.float32(req.guidance) * (eps_text - eps_uncond)
            if req.guidance_rescale > 0:
                out_sample = rescale_guided(out_sample, eps_text, req.guidance_rescale)
        self.latents = self.sched.step(self.state, i, out_sample, self.latents, self.rng).astype(np.float32, copy=False)
        self.index += 1
        ip = self.inpaint
        if ip is not None and ip.blends:
            # the init latents at the next step's noise level (after the last step: themselves) outside the mask
            proper = ip.image_latents if self.done else self.sched.add_noise(ip.image_latents, ip.noise, self.index)
            self.latents = ((np.float32(1) - ip.mask) * proper + ip.mask * self.latents).astype(np.float32)
        return Step(k, self.total, float(self.sched.timesteps[i]), self.latents)


def control_residuals(sessions: dict, loops: Sequence[Denoising], feeds: list[dict], limit: int | None
                      ) -> list[tuple[str, dict[str, np.ndarray]] | None]:
    """Each loop's UNet graph and summed residuals (ControlNets) or features (T2I-Adapters) for this step, by the
    graph's input names; None where nothing acts on it now. Each ControlNet runs once over every loop that uses
    it. ``feeds``: the loops' UNet inputs."""
    calls: dict[str, list] = {}   # component -> [(loop index, control, its scale now)]
    sums: list[tuple[str, dict[str, np.ndarray]] | None] = [None] * len(loops)

    def add(k: int, graph: str, values: dict[str, np.ndarray]) -> None:
        had = sums[k]
        sums[k] = (graph, values if had is None else {n: had[1][n] + v for n, v in values.items()})

    for k, loop in enumerate(loops):
        for control in loop.controls:
            scale = control.scale_at(loop.completed, loop.total)
            if scale == 0:   # a zero scale adds exact zeros: skipped
                continue
            if control.features is None:
                calls.setdefault(control.component, []).append((k, control, scale))
                continue
            rows = len(feeds[k]["sample"])   # the adapter's features, the same for every row
            names = list(control.features)
            add(k, control.unet, {n: np.repeat(f, rows, axis=0)
                                  for n, f in scaled(control.features, names, [scale] * len(names)).items()})
    for component, uses in calls.items():
        session = sessions[component]
        wanted = [i.name for i in session.inputs]
        channels = session.inputs[0].shape[1]   # the latents' (an inpainting UNet's sample has more)
        inputs = []
        for k, control, _ in uses:
            loop, feed = loops[k], feeds[k]
            half = loop.guess_mode and loop.req.guided   # guess mode: the conditional half only
            rows = slice(len(feed["sample"]) // 2, None) if half else slice(None)
            one = {"sample": feed["sample"][rows, :channels], "controlnet_cond": control.image}
            one.update({n: feed[n][rows] for n in wanted if n not in one})   # timestep, text states, SDXL's
            inputs.append(one)
        out = _run_batched(session, inputs, limit)
        offsets = np.cumsum([f["sample"].shape[0] for f in inputs])[:-1]
        names = list(out)   # down_residual_0 .. n-1, mid_residual, in order
        parts = {name: np.split(out[name], offsets) for name in names}
        for j, (k, control, scale) in enumerate(uses):
            loop = loops[k]
            residuals = scaled({n: p[j] for n, p in parts.items()}, names,
                               residual_scales(len(names), scale, loop.guess_mode, control.global_pool))
            if loop.guess_mode and loop.req.guided:   # the unconditional half gets nothing added
                residuals = {n: np.concatenate([np.zeros_like(r), r]) for n, r in residuals.items()}
            add(k, control.unet, residuals)
    return sums


def evaluate_unet(sessions: dict, loops: Sequence[Denoising], feature_cache: dict | None = None,
                  cache_interval: int | None = None, limit: int | None = None) -> list[np.ndarray]:
    """One UNet evaluation of each of ``loops``, batched; each loop's ``out_sample`` in order.

    Without feature caching, one call of ``sessions["unet"]`` over all loops. With it, the loops whose
    evaluation count is a multiple of ``cache_interval`` go through the deep UNet (each keeping its deep
    feature) and the others through the shallow UNet on their own cached feature: at most two calls.
    ``limit``: the most samples one call may take (a TensorRT plan's profile); larger batches are split.
    Loops with ControlNets or T2I-Adapters acting this step go through the UNet graph taking their residuals
    (``unet_control`` / ``unet_adapter``), one call each; the loops with none join the first of those calls,
    adding zeros (x + 0 is x: the same numbers as the plain UNet), so requests with and without ControlNets
    share one UNet call.
    """
    if any(loop.controls for loop in loops):
        feeds = [loop.unet_inputs() for loop in loops]
        residuals = control_residuals(sessions, loops, feeds, limit)
        graphs = list(dict.fromkeys(r[0] for r in residuals if r is not None))
        if graphs:
            example = next(r[1] for r in residuals if r is not None and r[0] == graphs[0])
            members: dict[str, list[int]] = {g: [] for g in graphs}
            for k, r in enumerate(residuals):
                if r is None:   # nothing acts on it now: zeros, in the first graph's call
                    rows = len(feeds[k]["sample"])
                    r = (graphs[0], {n: np.zeros((rows, *a.shape[1:]), np.float32) for n, a in example.items()})
                feeds[k].update(r[1])
                members[r[0]].append(k)
            outs: dict[int, np.ndarray] = {}
            for graph, ks in members.items():
                out = _run_batched(sessions[graph], [feeds[k] for k in ks], limit)["out_sample"]
                for k, part in zip(ks, np.split(out, np.cumsum([len(feeds[k]["sample"]) for k in ks])[:-1])):
                    outs[k] = part
            return [outs[k] for k in range(len(loops))]
    if feature_cache is None:
        groups = [("unet", list(loops), False)]
    else:
        deep = [loop for loop in loops if loop.completed % cache_interval == 0]
        shallow = [loop for loop in loops if loop.completed % cache_interval != 0]
        groups = [(feature_cache["deep"], deep, True), (feature_cache["shallow"], shallow, False)]
    outs: dict[int, np.ndarray] = {}
    for component, members, keeps_feature in groups:
        if not members:
            continue
        feeds = [loop.unet_inputs() for loop in members]
        if feature_cache is not None and not keeps_feature:
            for feed, loop in zip(feeds, members):
                feed[feature_cache["feature"]] = loop.feature
        result = _run_batched(sessions[component], feeds, limit)
        offsets = np.cumsum([f["sample"].shape[0] for f in feeds])[:-1]
        parts = {name: np.split(value, offsets) for name, value in result.items()}
        for k, loop in enumerate(members):
            outs[id(loop)] = parts["out_sample"][k]
            if keeps_feature:
                loop.feature = parts[feature_cache["feature"]][k]
    return [outs[id(loop)] for loop in loops]


def _run_batched(session, feeds: list[dict[str, np.ndarray]], limit: int | None) -> dict[str, np.ndarray]:
    """The feeds concatenated on the batch axis, run in calls of at most ``limit`` samples, or of what the session
    itself takes when that is fewer (a ControlNet's or residual UNet's TensorRT plan built with a smaller
    ``sdrt build --batch`` than the UNet's)."""
    dim_limit = getattr(session, "dim_limit", None)   # wrappers (spies, stand-ins) may not say
    own = dim_limit("sample", 0) if dim_limit is not None else None
    limit = own if limit is None else limit if own is None else min(limit, own)
    batch = feeds[0] if len(feeds) == 1 else {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
    rows = batch["sample"].shape[0]
    if limit is None or rows <= limit:
        return session.run(batch)
    calls = [session.run({name: value[i:i + limit] for name, value in batch.items()}) for i in range(0, rows, limit)]
    return {name: np.concatenate([c[name] for c in calls]) for name in calls[0]}


def rescale_guided(guided: np.ndarray, text: np.ndarray, factor: float) -> np.ndarray:
    """diffusers' ``rescale_noise_cfg`` (Lin et al. 2023, section 3.4): give each sample of the guided prediction
    the standard deviation of the text-conditioned one, mixed with the unrescaled by ``factor``. The deviations
    are PyTorch's ``std``: over all but the batch axis, with Bessel's correction."""
    axes = tuple(range(1, guided.ndim))
    ratio = text.std(axis=axes, ddof=1, keepdims=True) / guided.std(axis=axes, ddof=1, keepdims=True)
    f = np.float32(factor)
    return (f * (guided * ratio) + (np.float32(1) - f) * guided).astype(np.float32, copy=False)


def guidance_embedding(guidance: float, dim: int, batch: int) -> np.ndarray:
    """An LCM-distilled UNet's ``timestep_cond``: a sinusoidal embedding of (guidance - 1) * 1000, [batch, dim]
    float32 (diffusers' get_guidance_scale_embedding, after VDM's; float32 as torch computes it)."""
    f32 = np.float32
    w = f32(guidance - 1) * f32(1000.0)
    half = dim // 2
    step = f32(np.log(f32(10000.0))) / f32(half - 1)
    # exp, sin and cos correctly rounded to float32 (in float64, then rounded): numpy's float32 SIMD versions
    # are an ulp off in places, which the angles, up to (guidance - 1) * 1000, amplify
    freqs = np.exp((np.arange(half, dtype=f32) * -step).astype(np.float64)).astype(f32)
    angles = (w * freqs).astype(np.float64)
    emb = np.concatenate([np.sin(angles), np.cos(angles)]).astype(f32)
    if dim % 2:
        emb = np.concatenate([emb, np.zeros(1, dtype=f32)])
    return np.tile(emb, (batch, 1))
