"""The step scheduler's policy, on plain objects: admission, grouping by shape, fairness, decode batches."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from sdrt.serve.batching import StepScheduler


@dataclass(eq=False)
class R:
    seq: int
    images: int = 1
    img2img: bool = False
    key: object = None
    latent_shape: object = None
    last_served: int = -1
    deadline: float = 1e9
    cancel_requested: bool = False


def running(seq, key, images=1, last_served=0):
    return R(seq, images=images, key=key, latent_shape=key, last_served=last_served)


def test_admission_is_first_come_first_served_within_capacity():
    s = StepScheduler(max_batch=4)
    queued = [R(0, images=2), R(1, images=3), R(2, images=1)]
    plan = s.schedule(queued, [running(9, "a", images=1)], [], now=0)
    assert [r.seq for r in plan.admit] == [0]  # 1 running + 2; the 3-image request does not fit, and 2 waits behind it
    plan = s.schedule(queued, [], [], now=0)
    assert [r.seq for r in plan.admit] == [0]
    big = R(5, images=6)
    assert s.schedule([big], [], [], now=0).admit == [big]  # larger than max_batch: runs alone


def test_img2img_admissions_are_limited_per_iteration():
    s = StepScheduler(max_batch=8, max_admit_encodes=1)
    queued = [R(0, img2img=True), R(1, img2img=True), R(2)]
    assert [r.seq for r in s.schedule(queued, [], [], now=0).admit] == [0]


def test_one_shape_per_unet_call_and_the_longest_waiting_group_first():
    s = StepScheduler(max_batch=8)
    a = [running(0, "a", last_served=5), running(1, "a", last_served=5)]
    b = [running(2, "b", last_served=4)]
    plan = s.schedule([], a + b, [], now=0)
    assert plan.step == b
    b[0].last_served = 6
    assert s.schedule([], a + b, [], now=0).step == a


def test_groups_alternate_so_no_shape_starves():
    s = StepScheduler(max_batch=8)
    pool = [running(i, "a" if i % 3 else "b") for i in range(6)]
    served = []
    for iteration in range(1, 7):
        group = s.schedule([], pool, [], now=0).step
        assert len({r.key for r in group}) == 1
        served.append(group[0].key)
        for r in group:
            r.last_served = iteration
    assert served == ["b", "a", "b", "a", "b", "a"] or served == ["a", "b", "a", "b", "a", "b"]


def test_a_group_is_capped_at_max_batch_images_oldest_first():
    s = StepScheduler(max_batch=4, max_running=16)
    pool = [running(i, "a", images=2, last_served=10 - i) for i in range(4)]
    step = s.schedule([], pool, [], now=0).step
    assert [r.seq for r in step] == [3, 2]


def test_requests_not_prepared_yet_do_not_step():
    s = StepScheduler()
    assert s.schedule([], [R(0)], [], now=0).step == []


def test_cancelled_and_expired_requests_leave_from_anywhere():
    s = StepScheduler()
    q = R(0, cancel_requested=True)
    run = running(1, "a")
    run.deadline = 5
    fin = R(2, key="a", latent_shape="a", cancel_requested=True)
    plan = s.schedule([q], [run], [fin], now=6)
    assert {(r.seq, why) for r, why in plan.finish} == {(0, "cancelled"), (1, "timeout"), (2, "cancelled")}
    assert not plan.admit and not plan.step and not plan.decode


def test_decode_batches_share_a_latent_shape():
    s = StepScheduler(decode_batch=3)
    done = [R(0, key="a", latent_shape="a", images=2), R(1, key="b", latent_shape="b"),
            R(2, key="a", latent_shape="a", images=2), R(3, key="a2", latent_shape="a")]
    assert [r.seq for r in s.schedule([], [], done, now=0).decode] == [0, 3]


def test_bad_settings():
    with pytest.raises(ValueError):
        StepScheduler(max_batch=0)
