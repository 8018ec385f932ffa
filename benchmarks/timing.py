"""What the benchmark scripts share: timing a callable after one warm-up call."""

from __future__ import annotations

import time
from typing import Callable


def time_calls(run: Callable[[], object], runs: int) -> list[float]:
    """Seconds per call of ``run`` for ``runs`` calls, after one untimed warm-up call."""
    run()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times
