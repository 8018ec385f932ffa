"""One accepted request in the serving engine: its state, its events and its one final answer.

A job's state moves only forward, ``queued -> running -> decoding -> one final outcome`` (or straight to an
outcome from any of them), and only through its engine (:class:`sdrt.serve.engine.Engine`), which makes every
change under its one lock: a final answer is set once, and nothing the worker does afterwards (a step that was
already running when ``close()`` answered "shutdown", say) changes it or adds an event after it.
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

log = logging.getLogger("sdrt.serve")


class JobState(str, enum.Enum):
    """Where a job is; the last six are its final outcomes (their values are what HTTP answers and metrics say)."""

    QUEUED = "queued"
    RUNNING = "running"
    DECODING = "decoding"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    ERROR = "error"
    REJECTED = "rejected"
    SHUTDOWN = "shutdown"

    __str__ = str.__str__          # "completed", in f-strings and logs as in JSON
    __format__ = str.__format__

    @property
    def final(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING, JobState.DECODING)

    def may_become(self, other: "JobState") -> bool:
        """The forward moves: the next working state, or any outcome from a state that is not final."""
        if self.final:
            return False
        return other.final or (self, other) in ((JobState.QUEUED, JobState.RUNNING),
                                                (JobState.RUNNING, JobState.DECODING))


OUTCOMES = tuple(s.value for s in JobState if s.final)


class JobFailed(Exception):
    """A job's final answer was not an image: ``outcome`` says why (cancelled, timeout, error, shutdown)."""

    def __init__(self, outcome: str, message: str):
        super().__init__(message)
        self.outcome = outcome
        self.message = message


@dataclass
class JobResult:
    images: list[np.ndarray]      # [H, W, 3] uint8 each
    request: Any                  # the checked sdrt.runtime.requests.Request
    timings: dict                 # queue_ms, text_encoder_ms, vae_encode_ms, unet_ms, unet_step_ms, vae_decode_ms, total_ms

    @property
    def seeds(self) -> list[int]:
        return [self.request.seed]


class Job:
    """One accepted request: its settings, its place in the engine, its events and its one final answer. Its
    ``state`` is changed by its engine alone (``Engine._move`` and ``Engine._answer``, under the engine's lock)."""

    _seqs = itertools.count()

    def __init__(self, req, timeout: float, preview_every: int = 0, tag: str | None = None, id_prefix: str = "",
                 now: float | None = None):
        self.id = id_prefix + uuid.uuid4().hex
        self.seq = next(self._seqs)
        self.req = req
        self.tag = tag                         # the API it came through, for the log line
        self.preview_every = preview_every
        self.images = req.batch
        self.img2img = req.img2img
        self.created = time.monotonic() if now is None else now   # on the engine's clock
        self.created_wall = time.time()
        self.deadline = self.created + timeout
        self.state = JobState.QUEUED
        self.cancel_requested = False
        self.key = None                        # batch key, once prepared
        self.latent_shape = None
        self.last_served = -1
        self.loop = None                       # the Denoising, once prepared
        self.timings: dict = {"unet_step_ms": []}
        self.started = None                    # engine-clock time of admission
        self.first_step_at = None
        self.result: JobResult | None = None
        self.error: JobFailed | None = None
        self.events: list[dict] = []           # replayed to late subscribers (preview payloads kept only last)
        self.last_preview: dict | None = None
        self._listeners: list[Callable[[dict], None]] = []
        self._lock = threading.RLock()         # guards the events and listeners (a listener may unsubscribe)
        self._done = threading.Event()

    # -- answers ----------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def outcome(self) -> str | None:
        return self.state.value if self.state.final else None

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

    def _settle(self, outcome: JobState, result: JobResult | None, message: str, now: float) -> dict:
        """Record the final answer (the engine calls this once, under its lock); the event that announces it."""
        self.state = outcome
        self.timings["total_ms"] = (now - self.created) * 1e3
        if outcome is JobState.COMPLETED:
            self.result = result
            event = {"event": "done", "id": self.id, "seeds": result.seeds, "timings": self.timings}
        else:
            self.error = JobFailed(outcome.value, message)
            event = {"event": "error", "id": self.id, "outcome": outcome.value, "message": message}
        self.loop = None  # latents and embeddings are no longer needed
        self._done.set()
        return event

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

    def _emit(self, event: dict, final: bool = False) -> None:
        """Send ``event`` to the listeners, in order; after the final answer only that answer's own event goes
        out (a worker still finishing a step when ``close()`` answered sends nothing more)."""
        with self._lock:
            if self._done.is_set() and not final:
                return
            if event["event"] == "preview":
                self.last_preview = event
            else:
                self.events.append(event)
            for listener in list(self._listeners):
                try:
                    listener(event)
                except Exception:  # a broken listener must not break the engine
                    log.exception("event listener failed for job %s", self.id)

    def describe(self) -> dict:
        """The job's state as JSON-ready data (``GET /v1/jobs/{id}``)."""
        loop = self.loop
        info = {"id": self.id, "state": self.state.value, "created": self.created_wall,
                "images": self.images, "steps": self.req.steps}
        if loop is not None:
            info["progress"] = {"step": loop.completed, "total": loop.total}
        if self.error is not None:
            info["error"] = self.error.message
        if self.done:
            info["timings"] = self.timings
        return info
