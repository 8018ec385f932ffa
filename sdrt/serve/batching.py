"""Which requests share the next model call: the step scheduler, pure logic apart from the loop that runs it.

At every iteration the engine asks :meth:`StepScheduler.schedule` for a :class:`Plan`, and only executes it:

* **finish**: requests cancelled or past their deadline, wherever they are (queued, running, decoding);
* **admit**: queued requests, first come first served, while the running set has room (``max_running``
  images; a request larger than that runs alone); at most ``max_admit_encodes`` img2img requests, whose VAE
  encode is the expensive part of admission. An admitted request joins the UNet batch at the next step;
* **step**: one UNet call over the running requests that share a batch key (latent shape and text length):
  the group that has waited longest since its last step goes first, so no shape starves, and within it the
  longest-waiting requests up to ``max_batch`` images;
* **decode**: finished requests of one latent shape, oldest first, up to ``decode_batch`` images.

Requests are duck-typed (:class:`Schedulable`), so the policy is tested without models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Protocol, Sequence


class Schedulable(Protocol):
    seq: int                  # arrival order
    images: int               # images this request makes (its share of max_batch)
    img2img: bool             # admission runs a VAE encode
    key: Hashable | None      # batch key once prepared (None before)
    latent_shape: tuple | None  # what a VAE decode batch must share
    last_served: int          # iteration of its last step (or of its admission)
    deadline: float           # monotonic seconds
    cancel_requested: bool


@dataclass
class Plan:
    finish: list[tuple[object, str]] = field(default_factory=list)  # (request, "cancelled" | "timeout")
    admit: list = field(default_factory=list)
    step: list = field(default_factory=list)
    decode: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.finish or self.admit or self.step or self.decode)


@dataclass
class StepScheduler:
    max_batch: int = 8               # images in one UNet call (a guided image is two UNet samples)
    max_running: int | None = None   # images being denoised at once (default: max_batch)
    decode_batch: int = 4            # images in one VAE decode (bounds how long a decode holds the step loop)
    max_admit_encodes: int = 1       # img2img admissions per iteration (each runs a VAE encode)

    def __post_init__(self):
        for name in ("max_batch", "decode_batch", "max_admit_encodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_running is None:
            self.max_running = self.max_batch

    def schedule(self, queued: Sequence, running: Sequence, finished: Sequence, now: float) -> Plan:
        plan = Plan()
        gone = set()
        for r in (*queued, *running, *finished):
            reason = "cancelled" if r.cancel_requested else "timeout" if now >= r.deadline else None
            if reason:
                plan.finish.append((r, reason))
                gone.add(id(r))
        queued = [r for r in queued if id(r) not in gone]
        running = [r for r in running if id(r) not in gone]
        finished = [r for r in finished if id(r) not in gone]

        plan.admit = self._admit(queued, running)
        plan.step = self._step_group([r for r in running if r.key is not None])
        plan.decode = self._decode_group(finished)
        return plan

    def _admit(self, queued: Sequence, running: Sequence) -> list:
        load = sum(r.images for r in running)
        encodes = 0
        admitted = []
        for r in sorted(queued, key=lambda r: r.seq):
            if load and load + r.images > self.max_running:
                break  # first come first served: a large request is not overtaken for good by small ones
            if r.img2img:
                if encodes == self.max_admit_encodes:
                    break
                encodes += 1
            admitted.append(r)
            load += r.images
        return admitted

    def _step_group(self, running: Sequence) -> list:
        if not running:
            return []
        groups: dict = {}
        for r in running:
            groups.setdefault(r.key, []).append(r)
        # the group whose longest-waiting member has waited longest; then arrival order
        members = min(groups.values(), key=lambda g: min((r.last_served, r.seq) for r in g))
        return _fill(sorted(members, key=lambda r: (r.last_served, r.seq)), self.max_batch)

    def _decode_group(self, finished: Sequence) -> list:
        if not finished:
            return []
        ordered = sorted(finished, key=lambda r: r.seq)
        shape = ordered[0].latent_shape
        return _fill([r for r in ordered if r.latent_shape == shape], self.decode_batch)


def _fill(candidates: Sequence, limit: int) -> list:
    """Candidates in order while their images fit ``limit``, skipping those that do not (the first always goes)."""
    chosen, images = [], 0
    for r in candidates:
        if chosen and images + r.images > limit:
            continue
        chosen.append(r)
        images += r.images
    return chosen
