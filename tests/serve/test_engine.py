"""The step-batching engine: batched requests equal the same requests run alone, and every request gets
exactly one final answer (completed, cancelled, timeout, error, shutdown)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from sdrt.errors import UserError
from sdrt.runtime.images import images_psnr
from sdrt.serve import Engine, JobFailed, Limits, NotAccepting, QueueFull

PSNR_FLOOR_DB = 60.0


@pytest.fixture(scope="module")
def pipe(sd1_engine):
    from sdrt.runtime import Pipeline

    return Pipeline(sd1_engine, load_encoder=True)


@pytest.fixture
def engine(pipe):
    eng = Engine(pipe, max_batch=8, max_queue=32, timeout=120).start()
    yield eng
    eng.close()


def _init_image(size=(24, 32)):
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xx * 5) % 256, (yy * 7) % 256, ((xx + yy) * 3) % 256], axis=-1).astype(np.float32)
    return (rgb / 127.5 - 1.0).transpose(2, 0, 1)[None].copy()


MIXED = [
    dict(prompt="a red circle on a blue background", steps=6, guidance=7.5, seed=1, scheduler="dpmpp_2m"),
    dict(prompt="a green square", negative_prompt="blurry", steps=4, guidance=5.0, seed=2, scheduler="euler_a",
         height=24, width=40),
    dict(prompt="a yellow star", steps=5, guidance=0.0, seed=3, scheduler="ddim"),          # guidance off
    dict(prompt="two blue triangles", steps=3, guidance=7.5, seed=4, scheduler="heun", num_images=2),
    dict(prompt="an orange circle", steps=6, guidance=3.0, seed=5, scheduler="pndm", height=24, width=40),
    dict(prompt="a purple square", steps=8, guidance=7.5, seed=6, scheduler="lms", init_image=_init_image(),
         strength=0.6),                                                                      # img2img
    dict(prompt="a white star", steps=4, guidance=1.0, seed=7, scheduler="unipc", num_images=3, height=40, width=24),
    dict(prompt="a black circle", steps=6, guidance=7.5, seed=8, scheduler="euler", init_image=_init_image(),
         strength=1.0, num_images=2),
    dict(prompt="a (red circle:1.3) BREAK " + ", ".join(["a [blue] square on a green background"] * 12), steps=4,
         guidance=7.5, seed=9, scheduler="ddim", negative_prompt="blurry"),                  # 3 prompt chunks
]


def test_concurrent_mixed_requests_equal_each_alone(pipe, engine):
    """9 requests at once, mixing sizes, step counts, schedulers, guidance on and off, img2img, n > 1 and a long
    weighted prompt (its chunks encoded in the same text-encoder call as the others' prompts)."""
    batch_sizes = []
    engine.observer.unet_call = lambda images, samples, seconds: batch_sizes.append(samples)
    jobs = [engine.submit(**settings) for settings in MIXED]
    results = [job.wait(timeout=120) for job in jobs]
    for settings, job, result in zip(MIXED, jobs, results):
        settings = dict(settings)
        alone = pipe.generate(settings.pop("prompt"), settings.pop("negative_prompt", None), **settings)
        assert len(result.images) == len(alone.images) == job.req.batch
        for ours, ref in zip(result.images, alone.images):
            assert ours.shape == ref.shape
            assert images_psnr(ours, ref) >= PSNR_FLOOR_DB, settings
        assert job.outcome == "completed" and result.seeds == [settings["seed"]]
    # requests really were batched: some UNet call carried samples of several requests
    assert max(batch_sizes) > max(2 * s.get("num_images", 1) for s in MIXED)


def test_requests_join_at_step_boundaries(pipe, engine):
    """A request submitted while another runs joins its UNet calls before the first one finishes."""
    calls = []
    engine.observer.unet_call = lambda images, samples, seconds: calls.append(images)
    first = engine.submit("a red circle", steps=40, guidance=7.5, seed=1)
    while not first.timings["unet_step_ms"]:
        time.sleep(0.001)
    second = engine.submit("a blue square", steps=3, guidance=7.5, seed=2)
    second.wait(60)
    assert not first.done, "the short request had to wait for the long one"
    first.wait(60)
    assert 2 in calls  # both requests' images in one UNet call


# cancellation and deadlines, step by step with a fake pipeline and a clock the test moves: test_lifecycle.py


def test_bad_settings_and_limits_are_user_errors(pipe):
    eng = Engine(pipe, max_batch=2, max_queue=4, limits=Limits(max_steps=10, max_images=2, max_pixels=32 * 32))
    eng.start(warmup=False)
    try:
        with pytest.raises(UserError, match="steps 11"):
            eng.submit("x", steps=11)
        with pytest.raises(UserError, match="num_images 3"):
            eng.submit("x", steps=2, num_images=3)
        with pytest.raises(UserError, match="pixels"):
            eng.submit("x", steps=2, height=40, width=40)
        with pytest.raises(UserError, match="timeout"):
            eng.submit("x", steps=2, timeout=10_000)
        with pytest.raises(UserError, match="guidance"):
            eng.submit("x", steps=2, guidance=float("nan"))
        assert eng.counts() == (0, 0)
    finally:
        eng.close()


def test_queue_bound_refuses_whole_batches(pipe):
    eng = Engine(pipe, max_batch=1, max_queue=2)
    eng.start(warmup=False)
    try:
        hold = eng.submit("x", steps=100, guidance=7.5, seed=1)
        while hold.state == "queued":
            time.sleep(0.001)
        accepted = eng.submit_many([dict(prompt="y", steps=2, seed=2), dict(prompt="z", steps=2, seed=3)])
        with pytest.raises(QueueFull) as e:
            eng.submit("w", steps=2)
        assert e.value.retry_after >= 1
        with pytest.raises(QueueFull):
            eng.submit_many([dict(prompt="v", steps=2)])
        assert eng.counts()[0] == 2  # nothing half-accepted
        hold.cancel()
        for job in accepted:
            assert job.wait(60).images
    finally:
        eng.close()


class _FailingUnet:
    """Wraps the UNet session: raises on calls whose batch has more than ``fail_over`` samples."""

    def __init__(self, session, fail_over):
        self.session, self.fail_over = session, fail_over

    def run(self, feeds):
        if feeds["sample"].shape[0] > self.fail_over:
            from sdrt.errors import StageError

            raise StageError("unet: onnxruntime failed (injected)")
        return self.session.run(feeds)


def test_a_failing_engine_call_fails_its_batch_and_the_engine_goes_on(pipe):
    eng = Engine(pipe, max_batch=8, max_queue=8).start()
    original = pipe.sessions["unet"]
    try:
        pipe.sessions["unet"] = _FailingUnet(original, fail_over=2)
        big = eng.submit("x", steps=3, guidance=7.5, num_images=2, seed=1)   # 4 samples: fails
        with pytest.raises(JobFailed) as e:
            big.wait(60)
        assert e.value.outcome == "error" and "injected" in e.value.message
        small = eng.submit("y", steps=3, guidance=7.5, seed=2)               # 2 samples: served
        assert small.wait(60).images
        assert eng.broken is None
    finally:
        pipe.sessions["unet"] = original
        eng.close()


def test_every_accepted_request_gets_one_answer_through_close(pipe):
    eng = Engine(pipe, max_batch=2, max_queue=16).start(warmup=False)
    answers = []
    jobs = [eng.submit("x", steps=50, guidance=7.5, seed=i) for i in range(6)]
    for job in jobs:
        job.subscribe(lambda ev: answers.append(ev) if ev["event"] in ("done", "error") else None)
    eng.close(drain_timeout=0.0)
    assert all(job.done for job in jobs)
    assert {job.outcome for job in jobs} <= {"completed", "shutdown"}
    assert sorted(ev["id"] for ev in answers) == sorted(job.id for job in jobs)  # one final event each
    with pytest.raises(NotAccepting):
        eng.submit("x", steps=2)


def test_drain_waits_for_accepted_requests(pipe):
    eng = Engine(pipe, max_batch=2, max_queue=16).start(warmup=False)
    jobs = [eng.submit("x", steps=4, guidance=7.5, seed=i) for i in range(3)]
    assert eng.drain(timeout=60)
    with pytest.raises(NotAccepting):
        eng.submit("late", steps=2)
    assert all(job.outcome == "completed" for job in jobs)
    eng.close()


def test_events_reach_late_subscribers(engine):
    job = engine.submit("a red circle", steps=4, guidance=7.5, seed=1, preview_every=2)  # pndm: 5 UNet calls
    job.wait(60)
    seen = []
    job.subscribe(seen.append)
    kinds = [ev["event"] for ev in seen]
    assert kinds[0] == "queued" and "started" in kinds and kinds[-1] == "done"
    steps = [ev for ev in seen if ev["event"] == "step"]
    assert [ev["step"] for ev in steps] == [1, 2, 3, 4, 5] and {ev["total"] for ev in steps} == {5}
    live = []
    job2 = engine.submit("a red circle", steps=4, guidance=7.5, seed=1, preview_every=2)
    lock = threading.Event()
    job2.subscribe(lambda ev: (live.append(ev), ev["event"] == "done" and lock.set()))
    assert lock.wait(60)
    previews = [ev for ev in live if ev["event"] == "preview"]
    assert [ev["step"] for ev in previews] == [2, 4]
    import base64

    assert base64.b64decode(previews[0]["image"])[:8] == b"\x89PNG\r\n\x1a\n"
