"""What the benchmark scripts share: timing a callable after one warm-up call."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Hashable, Mapping


def time_calls(run: Callable[[], object], runs: int) -> list[float]:
    """Seconds per call of ``run`` for ``runs`` calls, after one untimed warm-up call."""
    run()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def time_interleaved(calls: Mapping[Hashable, Callable[[], object]], runs: int,
                     clock: Callable[[], float] = time.perf_counter) -> dict:
    """Median milliseconds per call of each callable, timed in turn (one warm-up call each, then ``runs``
    rounds of one call each), so that a shared machine's drifting load falls on every variant alike.
    ``clock=time.process_time`` counts this process's CPU time instead: on a machine loaded by others, with
    one thread, it measures the work rather than the wait."""
    for call in calls.values():
        call()
    times: dict = {key: [] for key in calls}
    for _ in range(runs):
        for key, call in calls.items():
            t0 = clock()
            call()
            times[key].append(clock() - t0)
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}
