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

Every accepted request gets exactly one final answer (:meth:`Job._finish` keeps the first): completed,
cancelled, timeout, error (an engine call failed: the requests in that call fail, the engine goes on), or
shutdown (the engine closed before it ran).
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from sdrt.errors import StageError, UserError
from sdrt.runtime.images import decode_to_uint8, encode_png
from sdrt.serve.batching import StepScheduler
from sdrt.serve.limits import LIMIT

log = logging.getLogger("sdrt.serve")

OUTCOMES = ("completed", "cancelled", "timeout", "error", "rejected", "shutdown")


class QueueFull(UserError):
    """The queue is at its bound; retry after ``retry_after`` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class NotAccepting(UserError):
    """The engine is draining or closed, or not started (HTTP 503)."""


class JobFailed(Exception):
    """A job's final answer was not an image: ``outcome`` says why (cancelled, timeout, error, shutdown)."""

    def __init__(self, outcome: str, message: str):
        super().__init__(message)
        self.outcome = outcome
        self.message = message


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


@dataclass
class JobResult:
    images: list[np.ndarray]      # [H, W, 3] uint8 each
    request: Any                  # the checked sdrt.runtime.pipeline.Request
    timings: dict                 # queue_ms, text_encoder_ms, vae_encode_ms, unet_ms, unet_step_ms, vae_decode_ms, total_ms

    @property
    def seeds(self) -> list[int]:
        return [self.request.seed]


class Observer:
    """What the engine reports as it works (Prometheus metrics implement it; the default ignores all)."""

    def finished(self, job: "Job") -> None: ...
    def first_step(self, seconds: float) -> None: ...
    def unet_call(self, images: int, samples: int, seconds: float) -> None: ...
    def stage(self, stage: str, seconds: float) -> None: ...
    def counts(self, waiting: int, running: int) -> None: ...


class Job:
    """One accepted request: its settings, its place in the engine, its events and its one final answer."""

    _seqs = itertools.count()

    def __init__(self, req, timeout: float, preview_every: int = 0, tag: str | None = None, id_prefix: str = ""):
        self.id = id_prefix + uuid.uuid4().hex
        self.seq = next(self._seqs)
        self.req = req
        self.tag = tag                         # the API it came through, for the log line
        self.preview_every = preview_every
        self.images = req.batch
        self.img2img = req.img2img
        self.created = time.monotonic()
        self.created_wall = time.time()
        self.deadline = self.created + timeout
        self.state = "queued"                  # queued -> running -> decoding -> one of OUTCOMES
        self.cancel_requested = False
        self.key = None                        # batch key, once prepared
        self.latent_shape = None
        self.last_served = -1
        self.loop = None                       # the Denoising, once prepared
        self.timings: dict = {"unet_step_ms": []}
        self.started = None                    # monotonic time of admission
        self.first_step_at = None
        self.result: JobResult | None = None
        self.error: JobFailed | None = None
        self.events: list[dict] = []           # replayed to late subscribers (preview payloads kept only last)
        self.last_preview: dict | None = None
        self._listeners: list[Callable[[dict], None]] = []
        self._lock = threading.Lock()
        self._done = threading.Event()

    # -- answers ----------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def outcome(self) -> str | None:
        return self.state if self.state in OUTCOMES else None

    def wait(self, timeout: float | None = None) -> JobResult:
        """Block until the final answer; the result, or JobFailed. ``timeout`` here only bounds the wait."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.id} still {self.state} after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result

    def cancel(self) -> None:
        """Ask for cancellation: a queued job leaves the queue, a running one at the next step boundary."""
        self.cancel_requested = True

    def _finish(self, outcome: str, result: JobResult | None = None, message: str = "") -> bool:
        """Record the final answer; False (and nothing changes) when the job already has one."""
        with self._lock:
            if self._done.is_set():
                return False
            self.state = outcome
            self.timings["total_ms"] = (time.monotonic() - self.created) * 1e3
            if outcome == "completed":
                self.result = result
                event = {"event": "done", "id": self.id, "seeds": result.seeds, "timings": self.timings}
            else:
                self.error = JobFailed(outcome, message)
                event = {"event": "error", "id": self.id, "outcome": outcome, "message": message}
            self.loop = None  # latents and embeddings are no longer needed
            self._done.set()
        self._emit(event)
        return True

    # -- events -----------------------------------------------------------------------------------------------
    def subscribe(self, listener: Callable[[dict], None]) -> Callable[[], None]:
        """Call ``listener(event)`` for every event from now on, after replaying those so far; returns an
        unsubscribe function. Listeners run on the engine's worker thread: they must not block."""
        with self._lock:
            history = list(self.events)
            if self.last_preview is not None and not self._done.is_set():
                history.append(self.last_preview)
            self._listeners.append(listener)
        for event in history:
            listener(event)

        def unsubscribe():
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)
        return unsubscribe

    def _emit(self, event: dict) -> None:
        with self._lock:
            if event["event"] == "preview":
                self.last_preview = event
            else:
                self.events.append(event)
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # a broken listener must not break the engine
                log.exception("event listener failed for job %s", self.id)

    def describe(self) -> dict:
        """The job's state as JSON-ready data (``GET /v1/jobs/{id}``)."""
        loop = self.loop
        info = {"id": self.id, "state": self.state, "created": self.created_wall,
                "images": self.images, "steps": self.req.steps}
        if loop is not None:
            info["progress"] = {"step": loop.completed, "total": loop.total}
        if self.error is not None:
            info["error"] = self.error.message
        if self.done:
            info["timings"] = self.timings
        return info


class Engine:
    """Queue, worker and the step scheduler over one :class:`sdrt.runtime.Pipeline`."""

    def __init__(self, pipeline, *, max_batch: int = LIMIT["max_batch"].default,
                 max_queue: int = LIMIT["max_queue"].default, timeout: float = LIMIT["timeout"].default,
                 limits: Limits | None = None, decode_batch: int | None = None, observer: Observer | None = None,
                 parameters_model: str = ""):
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
        self._queue: list[Job] = []
        self._running: list[Job] = []
        self._finished: list[Job] = []        # denoised, waiting for the VAE decode
        self._jobs: dict[str, Job] = {}       # by id, kept a while after their answer for GET /v1/jobs/{id}
        self._cv = threading.Condition()
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

    def close(self, drain_timeout: float = 0.0) -> None:
        """Drain for up to ``drain_timeout`` s, answer whatever is left with 'shutdown', stop the worker."""
        self.drain(drain_timeout)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._cv:
            left = self._queue + self._running + self._finished
            self._queue, self._running, self._finished = [], [], []
        for job in left:
            self._answer(job, "shutdown", message="the service shut down before this request finished")

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
            jobs = [Job(req, timeout, preview_every, tag, self.job_id_prefix) for req in reqs]
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
                    plan = self.scheduler.schedule(self._queue, self._running, self._finished, time.monotonic())
                    for job, _ in plan.finish:
                        self._remove(job)
                    for job in plan.admit:
                        self._queue.remove(job)
                        self._running.append(job)
                        job.state, job.started, job.last_served = "running", time.monotonic(), self._iteration
                    if plan.admit:
                        self._announce_positions()
                    self._iteration += 1
                for job, reason in plan.finish:
                    self._answer(job, reason, message=("cancelled" if reason == "cancelled" else
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
                self._queue, self._running, self._finished = [], [], []
            for job in left:
                self._answer(job, "error", message=self.broken)

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
                self._remove(job)
                self._answer(job, "error", message=message)

    def _remove(self, job: Job) -> None:
        with self._cv:
            for pool in (self._queue, self._running, self._finished):
                if job in pool:
                    pool.remove(job)
            self._cv.notify_all()

    def _answer(self, job: Job, outcome: str, result: JobResult | None = None, message: str = "") -> None:
        if not job._finish(outcome, result, message):
            return
        if job.tag == "warmup":
            log.info("warm-up request %s in %.0f ms", outcome, job.timings["total_ms"])
            return
        self.observer.finished(job)
        if outcome == "completed":
            alpha = 0.2
            self._service_s = (1 - alpha) * self._service_s + alpha * job.timings["total_ms"] / 1e3
        req = job.req
        log.info(json.dumps({
            "event": "request", "id": job.id, "api": job.tag, "outcome": outcome, "size": f"{req.width}x{req.height}",
            "steps": req.steps, "images": req.batch, "scheduler": req.scheduler or None, "guidance": req.guidance,
            "img2img": job.img2img, "seed": req.seed,
            "queue_ms": round(job.timings.get("queue_ms", job.timings["total_ms"]), 1),
            "total_ms": round(job.timings["total_ms"], 1), **({"error": message} if message else {})}))

    # -- the three engine calls -------------------------------------------------------------------------------
    def _prepare(self, jobs: list[Job]) -> None:
        """Encode the admitted requests' prompts in one call (one by one if that call fails), then start each."""
        pipe = self.pipeline
        now = time.monotonic()
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
        job.loop = self.pipeline.start(job.req, texts=texts, timings=timings)
        job.timings["text_encoder_ms"] = timings.get("text_encoder_ms", text_ms)
        if "vae_encode_ms" in timings:
            job.timings["vae_encode_ms"] = timings["vae_encode_ms"]
            self.observer.stage("vae_encoder", timings["vae_encode_ms"] / 1e3)
        job.latent_shape = job.loop.latents.shape[1:]
        job.key = (job.latent_shape, job.loop.context.shape[1:])
        job._emit({"event": "started", "id": job.id, "total": job.loop.total})

    def _step(self, jobs: list[Job]) -> None:
        t0 = time.perf_counter()
        outs = self.pipeline.evaluate_unet([job.loop for job in jobs])
        seconds = time.perf_counter() - t0
        self.observer.unet_call(sum(j.images for j in jobs), sum(len(o) for o in outs), seconds)
        now = time.monotonic()
        for job, part in zip(jobs, outs):
            self._guarded([job], lambda js, part=part: self._advance(js[0], part, seconds, now))

    def _advance(self, job: Job, out: np.ndarray, seconds: float, now: float) -> None:
        step = job.loop.advance(out)
        job.last_served = self._iteration
        job.timings["unet_step_ms"].append(seconds * 1e3)
        if job.first_step_at is None:
            job.first_step_at = now
            self.observer.first_step(now - job.created)
        job._emit({"event": "step", "id": job.id, "step": step.index + 1, "total": step.total})
        if job.preview_every and (step.index + 1) % job.preview_every == 0 and step.index + 1 < step.total:
            png = encode_png(self.pipeline.decode_preview(step.latents[:1])[0])
            job._emit({"event": "preview", "id": job.id, "step": step.index + 1,
                       "image": base64.b64encode(png).decode("ascii")})
        if job.loop.done:
            with self._cv:
                if job in self._running:
                    self._running.remove(job)
                    self._finished.append(job)
            job.state = "decoding"

    def _decode(self, jobs: list[Job]) -> None:
        t0 = time.perf_counter()
        samples = self.pipeline.decode_batch([job.loop.latents for job in jobs])
        ms = (time.perf_counter() - t0) * 1e3
        self.observer.stage("vae_decoder", ms / 1e3)
        for job, part in zip(jobs, samples):
            self._remove(job)
            job.timings["vae_decode_ms"] = ms
            job.timings["unet_ms"] = sum(job.timings["unet_step_ms"])
            if not np.isfinite(part).all():
                self._answer(job, "error", message="vae_decoder produced NaN or inf; the engine or its precision is "
                                                   "broken for these inputs")
                continue
            self._answer(job, "completed", JobResult(list(decode_to_uint8(part)), job.req, job.timings))

    # -- convenience --------------------------------------------------------------------------------------------
    def generate(self, prompt, negative_prompt=None, **settings) -> JobResult:
        """Submit and wait: the result, or JobFailed."""
        return self.submit(prompt, negative_prompt, **settings).wait()
