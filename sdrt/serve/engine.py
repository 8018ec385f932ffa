"""The step-batching engine: many requests, one worker, one UNet call per step over all that can share it.

Usable from Python without HTTP::

    from sdrt.runtime import Pipeline
    from sdrt.serve import Engine

    engine = Engine(Pipeline("engines/sd15"), max_batch=8).start()
    job = engine.submit("a red circle", steps=25, seed=1)       # returns at once
    result = job.wait()                                          # JobResult, or raises JobFailed
    engine.close()

One worker thread owns the pipeline's sessions. Each iteration it executes the :class:`Plan` the step
scheduler (``batching.py``) decides: requests that were cancelled or passed their deadline get their final
answer, queued requests are admitted (their prompts encoded in one text-encoder call, initial latents drawn),
one UNet call runs over the running requests that share a latent shape, each with its own timestep, text
embeddings, guidance and scheduler (``sdrt.runtime.pipeline.Denoising``), and finished requests are decoded
by the VAE in batches. Each request's image therefore equals what ``Pipeline.generate`` gives for it alone,
up to the rounding of a different batch.

Every accepted request gets exactly one final answer (:meth:`Engine._answer` keeps the first; job states
change only there and in :meth:`Engine._move`, under the engine's one lock): completed,
cancelled, timeout, error (an engine call failed: the requests in that call fail, the engine goes on), or
shutdown (the engine closed before it ran).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from sdrt.errors import StageError, UserError
from sdrt.runtime.images import decode_to_uint8, encode_png
from sdrt.serve.batching import StepScheduler
from sdrt.serve.jobs import OUTCOMES, Job, JobFailed, JobResult, JobState  # noqa: F401 - importable from here
from sdrt.serve.limits import LIMIT

log = logging.getLogger("sdrt.serve")



class QueueFull(UserError):
    """The queue is at its bound; retry after ``retry_after`` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class NotAccepting(UserError):
    """The engine is draining or closed, or not started (HTTP 503)."""


@dataclass
class Limits:
    """What one request may ask for (each refused with a UserError naming the limit)."""

    max_pixels: int | None = LIMIT["max_pixels"].default   # height * width; default: 4x the model's default size
    max_steps: int = LIMIT["max_steps"].default
    max_images: int = LIMIT["max_images"].default          # images per request (prompts x num_images)

    def check(self, req, model) -> None:
        max_pixels = self.max_pixels or 4 * model.default_height * model.default_width
        if req.height * req.width > max_pixels:
            raise UserError(f"size {req.width}x{req.height}: at most {max_pixels} pixels (width x height) per image "
                            f"on this service")
        if req.steps > self.max_steps:
            raise UserError(f"steps {req.steps}: at most {self.max_steps} on this service")
        if req.batch > self.max_images:
            raise UserError(f"num_images {req.batch}: at most {self.max_images} images per request on this service")


class Observer:
    """What the engine reports as it works (Prometheus metrics implement it; the default ignores all)."""

    def finished(self, job: "Job") -> None: ...
    def first_step(self, seconds: float) -> None: ...
    def unet_call(self, images: int, samples: int, seconds: float) -> None: ...
    def stage(self, stage: str, seconds: float) -> None: ...
    def counts(self, waiting: int, running: int) -> None: ...


class Engine:
    """Queue, worker and the step scheduler over one :class:`sdrt.runtime.Pipeline`."""

    def __init__(self, pipeline, *, max_batch: int = LIMIT["max_batch"].default,
                 max_queue: int = LIMIT["max_queue"].default, timeout: float = LIMIT["timeout"].default,
                 limits: Limits | None = None, decode_batch: int | None = None, observer: Observer | None = None,
                 parameters_model: str = "", clock: Callable[[], float] = time.monotonic,
                 share_controlnets: bool = True):
        """``clock``: monotonic seconds, for deadlines and queue times (tests inject one they control).
        ``share_controlnets``: requests with different ControlNets (or none) share a step's UNet call (False:
        each set of ControlNets batches apart, for comparison)."""
        if max_queue < 1:
            raise UserError(f"max_queue {max_queue}: must be >= 1")
        if not timeout > 0:
            raise UserError(f"timeout {timeout}: must be > 0 seconds")
        if max_batch < 1:
            raise UserError(f"max_batch {max_batch}: must be >= 1")
        # the most samples one UNet call takes (a TensorRT plan's profile); a guided image is two samples
        limit = getattr(pipeline, "unet_batch_limit", None)
        if limit is not None and max_batch > max(1, limit // 2):
            raise UserError(f"max_batch {max_batch}: this engine's UNet takes at most {limit} samples per call "
                            f"({max(1, limit // 2)} guided images); use --max-batch {max(1, limit // 2)} or rebuild "
                            "the plans with a larger `sdrt build --batch`")
        self.pipeline = pipeline
        self.scheduler = StepScheduler(max_batch=max_batch, decode_batch=decode_batch or max(1, min(4, max_batch)))
        self.max_queue = max_queue
        self.timeout = float(timeout)
        self.limits = limits or Limits()
        self.observer = observer or Observer()
        self.parameters_model = parameters_model
        self._clock = clock
        self.share_controlnets = share_controlnets
        self._queue: list[Job] = []
        self._running: list[Job] = []
        self._finished: list[Job] = []        # denoised, waiting for the VAE decode
        self._jobs: dict[str, Job] = {}       # by id, kept a while after their answer for GET /v1/jobs/{id}
        self._cv = threading.Condition()       # the one lock: the pools and every job's state change under it
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._iteration = 0
        self._service_s = 1.0                 # running mean of a job's time in the engine, for Retry-After
        self.ready = False
        self.broken: str | None = None        # set when the worker died: health checks fail
        self.keep_finished = 256             # answered jobs kept (with their images) for GET /v1/jobs/{id}
        self.job_id_prefix = ""               # set by a deployment whose router sends a job's calls to its owner

    # -- life cycle -----------------------------------------------------------------------------------------
    def start(self, warmup: bool = True) -> "Engine":
        """Start the worker; with ``warmup``, run one one-step request through it before accepting others."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._worker, name="sdrt-engine", daemon=True)
        self._thread.start()
        if warmup:
            job = self._accept([self._warmup_request()], timeout=self.timeout, tag="warmup", internal=True)[0]
            job.wait()
            with self._cv:
                self._jobs.pop(job.id, None)
        self._accepting = True
        self.ready = True
        return self

    def _warmup_request(self):
        m = self.pipeline.model
        return self.pipeline.request("warm-up", steps=1, guidance=2.0, seed=0,
                                     height=m.default_height, width=m.default_width)

    def stop_accepting(self) -> None:
        """New submissions are refused (NotAccepting); what was accepted goes on."""
        self._accepting = False
        self.ready = False

    def drain(self, timeout: float) -> bool:
        """Refuse new requests and wait up to ``timeout`` s for the accepted ones; True when all answered."""
        self.stop_accepting()
        end = time.monotonic() + timeout
        with self._cv:
            while not all(job.done for job in self._jobs.values()):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.1))
        return True

    def close(self, drain_timeout: float = 0.0, join_timeout: float = 60.0) -> None:
        """Drain for up to ``drain_timeout`` s, stop the worker (waiting up to ``join_timeout`` s for the engine
        call it is in), and answer whatever is left with 'shutdown'. A worker still inside a call then changes
        nothing of those jobs: their answer is final."""
        self.drain(drain_timeout)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=join_timeout)
        with self._cv:
            left = self._queue + self._running + self._finished
        for job in left:
            self._answer(job, JobState.SHUTDOWN, message="the service shut down before this request finished")

    # -- submission -----------------------------------------------------------------------------------------
    def submit(self, prompt, negative_prompt=None, *, timeout: float | None = None, preview_every: int = 0,
               tag: str | None = None, **settings) -> Job:
        """Check the settings (``Pipeline.request``'s, plus this service's limits) and queue the request."""
        return self.submit_many([dict(prompt=prompt, negative_prompt=negative_prompt, **settings)],
                                timeout=timeout, preview_every=preview_every, tag=tag)[0]

    def submit_many(self, requests: Sequence[dict], *, timeout: float | None = None, preview_every: int = 0,
                    tag: str | None = None) -> list[Job]:
        """Several requests accepted together or not at all (an A1111 batch of seeds, say)."""
        if timeout is None:
            timeout = self.timeout
        elif isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= self.timeout:
            raise UserError(f"timeout {timeout!r}: must be a number of seconds in (0, {self.timeout:g}]")
        if isinstance(preview_every, bool) or not isinstance(preview_every, int) or preview_every < 0:
            raise UserError(f"preview_every {preview_every!r}: must be an integer >= 0 (0: no previews)")
        reqs = []
        for settings in requests:
            settings = dict(settings)
            req = self.pipeline.request(settings.pop("prompt"), settings.pop("negative_prompt", None), **settings)
            self.limits.check(req, self.pipeline.model)
            reqs.append(req)
        return self._accept(reqs, timeout, preview_every, tag)

    def _accept(self, reqs, timeout: float, preview_every: int = 0, tag: str | None = None,
                internal: bool = False) -> list[Job]:
        if len(reqs) > self.max_queue:
            raise UserError(f"{len(reqs)} requests at once: this service queues at most {self.max_queue}")
        with self._cv:
            if not (self._accepting or internal) or self._stopping:
                raise NotAccepting("the service is not accepting requests (starting, draining or shut down)")
            if len(self._queue) + len(reqs) > self.max_queue:
                raise QueueFull(f"the queue is full ({len(self._queue)} waiting, at most {self.max_queue}); retry later",
                                retry_after=self._retry_after())
            jobs = [Job(req, timeout, preview_every, tag, self.job_id_prefix, now=self._clock()) for req in reqs]
            for job in jobs:
                self._jobs[job.id] = job
                self._queue.append(job)
            self._trim_jobs()
            self._announce_positions()
            self._cv.notify_all()
        return jobs

    def _retry_after(self) -> int:
        per_slot = self._service_s / max(1, self.scheduler.max_running)
        return max(1, math.ceil(per_slot * (len(self._queue) + 1)))

    def get(self, job_id: str) -> Job | None:
        with self._cv:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        with self._cv:
            job = self._jobs.get(job_id)
            if job is not None:
                job.cancel()
                self._cv.notify_all()
        return job

    def counts(self) -> tuple[int, int]:
        """(waiting, running): queued requests, and those being denoised or decoded."""
        with self._cv:
            return len(self._queue), len(self._running) + len(self._finished)

    def _trim_jobs(self) -> None:
        done = [j for j in self._jobs.values() if j.done]
        for job in done[: max(0, len(done) - self.keep_finished)]:
            del self._jobs[job.id]

    def _announce_positions(self) -> None:
        for position, job in enumerate(self._queue):
            job._emit({"event": "queued", "id": job.id, "position": position})

    # -- the worker ---------------------------------------------------------------------------------------------
    def _worker(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stopping and not (self._queue or self._running or self._finished):
                        self._cv.wait(0.5)
                    if self._stopping:
                        return
                    plan = self.scheduler.schedule(self._queue, self._running, self._finished, self._clock())
                    finish = self._apply_plan(plan)
                for job, outcome in finish:
                    self._answer(job, outcome, message=("cancelled" if outcome is JobState.CANCELLED else
                                                        "the request's deadline passed before it finished"))
                self._guarded(plan.admit, self._prepare)
                self._guarded(plan.step, self._step)
                self._guarded(plan.decode, self._decode)
                self.observer.counts(*self.counts())
                if not plan:
                    time.sleep(0.001)
        except BaseException as e:  # a bug of ours: fail loudly, answer everything, and let health checks see it
            self.broken = f"the engine's worker stopped: {type(e).__name__}: {e}"
            log.exception("engine worker stopped")
            self.stop_accepting()
            with self._cv:
                left = self._queue + self._running + self._finished
            for job in left:
                self._answer(job, JobState.ERROR, message=self.broken)

    # -- the one owner of job states: every change below is made under self._cv --------------------------------
    def _apply_plan(self, plan) -> list[tuple[Job, JobState]]:
        """Apply the scheduler's plan to the pools (the caller holds the lock): admitted jobs start running;
        the jobs to finish (cancelled, past their deadline) are returned to be answered."""
        for job in plan.admit:
            self._move(job, JobState.RUNNING)
            job.started, job.last_served = self._clock(), self._iteration
        if plan.admit:
            self._announce_positions()
        self._iteration += 1
        return [(job, JobState(reason)) for job, reason in plan.finish]

    def _move(self, job: Job, state: JobState) -> bool:
        """Move ``job`` forward to a working state and into its pool (the caller holds the lock); False when
        it already has its final answer."""
        if not job.state.may_become(state):
            return False
        pools = {JobState.QUEUED: self._queue, JobState.RUNNING: self._running, JobState.DECODING: self._finished}
        pools[job.state].remove(job)
        pools[state].append(job)
        job.state = state
        return True

    def _answer(self, job: Job, outcome: JobState, result: JobResult | None = None, message: str = "") -> None:
        """Give ``job`` its final answer, once: a job already answered keeps its first answer."""
        with self._cv:
            if job.state.final:
                return
            for pool in (self._queue, self._running, self._finished):
                if job in pool:
                    pool.remove(job)
            event = job._settle(outcome, result, message, self._clock())
            self._cv.notify_all()
        job._emit(event, final=True)
        if job.tag == "warmup":
            log.info("warm-up request %s in %.0f ms", outcome, job.timings["total_ms"])
            return
        self.observer.finished(job)
        if outcome is JobState.COMPLETED:
            alpha = 0.2
            self._service_s = (1 - alpha) * self._service_s + alpha * job.timings["total_ms"] / 1e3
        req = job.req
        log.info(json.dumps({
            "event": "request", "id": job.id, "api": job.tag, "outcome": outcome.value,
            "size": f"{req.width}x{req.height}", "steps": req.steps, "images": req.batch,
            "scheduler": req.scheduler or None, "guidance": req.guidance, "img2img": job.img2img, "seed": req.seed,
            "queue_ms": round(job.timings.get("queue_ms", job.timings["total_ms"]), 1),
            "total_ms": round(job.timings["total_ms"], 1), **({"error": message} if message else {})}))

    def _guarded(self, jobs: list[Job], action: Callable[[list[Job]], None]) -> None:
        """Run one engine call; if it fails, the requests in it fail with its message and the engine goes on."""
        if not jobs:
            return
        try:
            action(jobs)
        except Exception as e:
            message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            log.error("engine call %s failed for %d request(s): %s", action.__name__, len(jobs), message)
            for job in jobs:
                self._answer(job, JobState.ERROR, message=message)

    # -- the three engine calls -------------------------------------------------------------------------------
    def _prepare(self, jobs: list[Job]) -> None:
        """Encode the admitted requests' prompts in one call (one by one if that call fails), then start each."""
        pipe = self.pipeline
        now = self._clock()
        for job in jobs:
            job.timings["queue_ms"] = (now - job.created) * 1e3
        t0 = time.perf_counter()
        # every admitted request's prompts through one batch (the model family decides how); if that fails,
        # each request is encoded alone by start(), so the one that broke the batch is the one that fails
        try:
            per_job = pipe.encode_batch([job.req for job in jobs])
        except (UserError, StageError):
            if len(jobs) == 1:
                raise
            per_job = [None] * len(jobs)
        ms = (time.perf_counter() - t0) * 1e3
        self.observer.stage("text_encoder", ms / 1e3)
        for job, texts in zip(jobs, per_job):
            self._guarded([job], lambda js, texts=texts: self._start(js[0], texts, ms))

    def _start(self, job: Job, texts, text_ms: float) -> None:
        timings: dict = {}
        loop = self.pipeline.start(job.req, texts=texts, timings=timings)
        with self._cv:
            if job.state.final:   # answered meanwhile (closed, say): nothing more to do for it
                return
            job.loop = loop
            job.timings["text_encoder_ms"] = timings.get("text_encoder_ms", text_ms)
            if "vae_encode_ms" in timings:
                job.timings["vae_encode_ms"] = timings["vae_encode_ms"]
            job.latent_shape = loop.latents.shape[1:]
            job.key = (job.latent_shape, loop.context.shape[1:])
            if not self.share_controlnets:
                job.key += (tuple(sorted(c.component for c in getattr(loop, "controls", ()))),)
        if "vae_encode_ms" in timings:
            self.observer.stage("vae_encoder", timings["vae_encode_ms"] / 1e3)
        job._emit({"event": "started", "id": job.id, "total": loop.total})

    def _step(self, jobs: list[Job]) -> None:
        with self._cv:
            loops = [(job, job.loop) for job in jobs if not job.state.final]
        if not loops:
            return
        t0 = time.perf_counter()
        outs = self.pipeline.evaluate_unet([loop for _, loop in loops])
        seconds = time.perf_counter() - t0
        self.observer.unet_call(sum(job.images for job, _ in loops), sum(len(o) for o in outs), seconds)
        now = self._clock()
        for (job, loop), out in zip(loops, outs):
            self._guarded([job], lambda js, loop=loop, out=out: self._advance(js[0], loop, out, seconds, now))

    def _advance(self, job: Job, loop, out: np.ndarray, seconds: float, now: float) -> None:
        """Apply the model's output to one job: its scheduler steps, and its state moves on under the lock."""
        step = loop.advance(out)
        with self._cv:
            if job.state.final:   # answered while the UNet ran (closed, cancelled): its answer stands
                return
            job.last_served = self._iteration
            job.timings["unet_step_ms"].append(seconds * 1e3)
            first = job.first_step_at is None
            if first:
                job.first_step_at = now
            if loop.done:
                self._move(job, JobState.DECODING)
        if first:
            self.observer.first_step(now - job.created)
        job._emit({"event": "step", "id": job.id, "step": step.index + 1, "total": step.total})
        if job.preview_every and (step.index + 1) % job.preview_every == 0 and step.index + 1 < step.total:
            png = encode_png(self.pipeline.decode_preview(step.latents[:1])[0])
            job._emit({"event": "preview", "id": job.id, "step": step.index + 1,
                       "image": base64.b64encode(png).decode("ascii")})

    def _decode(self, jobs: list[Job]) -> None:
        with self._cv:
            loops = [(job, job.loop) for job in jobs if not job.state.final]
        if not loops:
            return
        t0 = time.perf_counter()
        samples = self.pipeline.decode_batch([loop.latents for _, loop in loops])
        ms = (time.perf_counter() - t0) * 1e3
        self.observer.stage("vae_decoder", ms / 1e3)
        for (job, _), part in zip(loops, samples):
            job.timings["vae_decode_ms"] = ms
            job.timings["unet_ms"] = sum(job.timings["unet_step_ms"])
            if not np.isfinite(part).all():
                self._answer(job, JobState.ERROR, message="vae_decoder produced NaN or inf; the engine or its "
                                                          "precision is broken for these inputs")
                continue
            images = self.pipeline.finish_images(job.req, decode_to_uint8(part))
            self._answer(job, JobState.COMPLETED, JobResult(images, job.req, job.timings))

    # -- convenience --------------------------------------------------------------------------------------------
    def generate(self, prompt, negative_prompt=None, **settings) -> JobResult:
        """Submit and wait: the result, or JobFailed."""
        return self.submit(prompt, negative_prompt, **settings).wait()
