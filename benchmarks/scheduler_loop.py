"""Per-step CPU cost of the denoising loop around the UNet: classifier-free guidance + scheduler, in numpy.

For one 512x512 image with guidance the UNet returns a 2x4x64x64 batch (unconditional, text). Each step the
pipeline mixes the halves, ``uncond + g * (text - uncond)``, scales the model input, and steps the scheduler;
this times exactly that, per scheduler, and prints the p50 / p90 in microseconds over many steps (after a
burn-in pass). Not a test: it prints figures.

    python benchmarks/scheduler_loop.py [--steps 50] [--passes 5] [--latent 64] [--guidance 7.5]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from sdrt.runtime.rng import TorchCPUGenerator
from sdrt.runtime.schedulers import SCHEDULER_NAMES, make_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.make_models import SD1_SCHEDULER  # noqa: E402

# Stable Diffusion 1.5's scheduler config; every scheduler is built from it, as `--scheduler NAME` would.
SD15 = SD1_SCHEDULER


def time_scheduler(name: str, steps: int, passes: int, latent: int, guidance: float) -> np.ndarray:
    """Microseconds per step (guidance mix + scale_model_input + step) over ``passes`` runs, first discarded."""
    rng = TorchCPUGenerator(0)
    sched = make_scheduler(name, SD15, steps)
    shape = (1, 4, latent, latent)
    unet_out = rng.randn((2, 4, latent, latent))  # stands in for the UNet: its values do not change the cost
    g = np.float32(guidance)
    timings = []
    for run in range(passes + 1):
        x = rng.randn(shape) * np.float32(sched.init_noise_sigma)
        state = sched.init_state(0)
        for i in range(len(sched.timesteps)):
            start = time.perf_counter_ns()
            uncond, text = unet_out[:1], unet_out[1:]
            eps = uncond + g * (text - uncond)
            sched.scale_model_input(x, i)
            x = sched.step(state, i, eps, x, rng)
            elapsed = time.perf_counter_ns() - start
            if run:  # the first pass is burn-in
                timings.append(elapsed / 1e3)
    return np.array(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--passes", type=int, default=5, help="timed passes over the schedule (after one burn-in)")
    parser.add_argument("--latent", type=int, default=64, help="latent height = width (64 for 512x512)")
    parser.add_argument("--guidance", type=float, default=7.5)
    args = parser.parse_args()

    print(f"numpy {np.__version__}, python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} cpus; UNet output 2x4x{args.latent}x{args.latent} float32; "
          f"{args.steps} steps x {args.passes} passes")
    print()
    print(f"| {'scheduler':<16} | {'calls':>5} | {'p50 us':>8} | {'p90 us':>8} | {'min us':>8} |")
    print(f"|{'-' * 18}|{'-' * 7}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for name in SCHEDULER_NAMES:
        steps = min(args.steps, 50) if name == "lcm" else args.steps  # LCM allows at most 50
        us = time_scheduler(name, steps, args.passes, args.latent, args.guidance)
        calls = len(us) // args.passes
        print(f"| {name:<16} | {calls:>5} | {np.percentile(us, 50):>8.1f} | {np.percentile(us, 90):>8.1f} | "
              f"{us.min():>8.1f} |")


if __name__ == "__main__":
    main()
