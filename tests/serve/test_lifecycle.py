"""The request lifecycle, step by step, without racing the wall clock: a fake pipeline whose UNet call waits
for the test's permission, and a clock the test moves. Every accepted request gets exactly one final answer,
and nothing changes it afterwards."""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from sdrt.runtime.denoising import Step
from sdrt.serve import Engine, JobFailed
from sdrt.serve.jobs import JobState

WAIT = 30   # seconds any blocking wait in these tests may take before it counts as a hang


class Clock:
    """Monotonic seconds that move only when the test says."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeLoop:
    """The Denoising interface the engine uses: a step count, latents and a context of fixed shapes."""

    def __init__(self, req):
        self.total, self.completed = req.steps, 0
        self.latents = np.zeros((req.batch, 4, 2, 2), np.float32)
        self.context = np.zeros((1, 3, 4), np.float32)

    @property
    def done(self) -> bool:
        return self.completed >= self.total

    def advance(self, out):
        self.completed += 1
        return Step(self.completed - 1, self.total, 0.0, self.latents)


class FakePipeline:
    """What the engine calls of a Pipeline; each UNet evaluation waits for a permit from the test."""

    model = SimpleNamespace(default_height=16, default_width=16)
    unet_batch_limit = None

    def __init__(self):
        self.arrivals: queue.Queue[threading.Event] = queue.Queue()   # one per UNet call that waits
        self.current: threading.Event | None = None
        self.free = False   # at teardown: no call waits

    def request(self, prompt, negative_prompt=None, *, steps=3, seed=0, num_images=1, **_):
        return SimpleNamespace(prompts=[prompt], steps=steps, batch=num_images, img2img=False, seed=seed, height=16,
                               width=16, scheduler="", guidance=7.5)

    def encode_batch(self, reqs):
        return [None] * len(reqs)

    def start(self, req, texts=None, timings=None):
        return FakeLoop(req)

    def evaluate_unet(self, loops):
        go = threading.Event()
        self.arrivals.put(go)
        assert self.free or go.wait(WAIT), "the test never let this UNet call finish"
        return [np.zeros((loop.latents.shape[0], 4, 2, 2), np.float32) for loop in loops]

    def decode_batch(self, latents):
        return [np.zeros((len(x), 3, 4, 4), np.float32) for x in latents]

    @staticmethod
    def finish_images(req, images):
        return list(images)

    def decode_preview(self, latents):
        return np.zeros((len(latents), 4, 4, 3), np.uint8)

    def wait_in_unet(self) -> None:
        """Return once the worker is inside a UNet call (it stays there until :meth:`step`)."""
        if self.current is None:
            self.current = self.arrivals.get(timeout=WAIT)

    def step(self, n: int = 1) -> None:
        """Let ``n`` UNet calls finish, one after the other."""
        for _ in range(n):
            self.wait_in_unet()
            self.current.set()
            self.current = None

    def release_all(self) -> None:
        self.free = True
        while self.current is not None or not self.arrivals.empty():
            (self.current or self.arrivals.get()).set()
            self.current = None


@pytest.fixture
def rig():
    pipe, clock = FakePipeline(), Clock()
    engine = Engine(pipe, max_batch=1, max_queue=8, timeout=100, clock=clock).start(warmup=False)
    yield pipe, clock, engine
    pipe.release_all()   # nothing may stay blocked
    engine.close(join_timeout=WAIT)


def events_of(job) -> list[dict]:
    seen: list[dict] = []
    job.subscribe(seen.append)
    return seen


def outcome(job) -> str:
    with pytest.raises(JobFailed) as e:
        job.wait(WAIT)
    return e.value.outcome


def test_a_deadline_that_passes_while_queued_answers_timeout_before_it_runs(rig):
    pipe, clock, engine = rig
    first = engine.submit("first", steps=3, timeout=50)
    pipe.wait_in_unet()                                   # the first runs; max_batch 1 keeps the second queued
    second = engine.submit("second", steps=3, timeout=10)
    clock.t += 20                                         # past the second's deadline, not the first's
    pipe.step()
    assert outcome(second) == "timeout" and second.started is None
    assert [e["event"] for e in events_of(second)] == ["queued", "error"]
    pipe.step(2)
    assert first.wait(WAIT).images and first.state is JobState.COMPLETED


def test_a_deadline_that_passes_while_running_answers_timeout_at_the_next_step(rig):
    pipe, clock, engine = rig
    job = engine.submit("long", steps=100, timeout=10)
    pipe.step()                 # one step within the deadline
    pipe.wait_in_unet()
    clock.t += 20
    pipe.step()                 # the step in progress completes; the deadline is seen at the boundary after it
    assert outcome(job) == "timeout"
    assert len(job.timings["unet_step_ms"]) == 2 and job.describe()["state"] == "timeout"


def test_cancel_queued_and_running(rig):
    pipe, clock, engine = rig
    running = engine.submit("running", steps=100)
    pipe.wait_in_unet()
    queued = engine.submit("queued", steps=3)
    queued.cancel()
    running.cancel()
    pipe.step()
    assert outcome(queued) == "cancelled" and queued.started is None
    assert outcome(running) == "cancelled" and len(running.timings["unet_step_ms"]) == 1


def test_close_while_the_worker_is_mid_step_gives_one_answer_that_stays(rig):
    pipe, clock, engine = rig
    job = engine.submit("last step", steps=1)
    seen = events_of(job)
    pipe.wait_in_unet()                         # the worker is inside the UNet call of the job's only step
    engine.close(join_timeout=0.05)             # gives up waiting for the worker: the job is answered now
    assert outcome(job) == "shutdown"
    pipe.step()                                 # the worker's step completes: its loop is done
    engine._thread.join(WAIT)
    assert not engine._thread.is_alive()
    assert job.state is JobState.SHUTDOWN and job.describe()["state"] == "shutdown"
    assert seen[-1] == {"event": "error", "id": job.id, "outcome": "shutdown",
                        "message": "the service shut down before this request finished"}
    assert not engine._finished and not engine._running   # the finished step did not move it to decoding


def test_job_states_move_only_forward():
    assert JobState.QUEUED.may_become(JobState.RUNNING) and JobState.RUNNING.may_become(JobState.DECODING)
    assert JobState.QUEUED.may_become(JobState.CANCELLED) and JobState.DECODING.may_become(JobState.COMPLETED)
    assert not JobState.RUNNING.may_become(JobState.QUEUED) and not JobState.QUEUED.may_become(JobState.DECODING)
    assert not any(s.may_become(t) for s in JobState if s.final for t in JobState)
    assert f"{JobState.TIMEOUT}" == "timeout" and JobState.TIMEOUT == "timeout"
