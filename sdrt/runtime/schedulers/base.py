"""The interface every scheduler implements, and what they share.

A scheduler is built once for a step count: its per-step tables (timesteps, sigmas, coefficients) are
precomputed in the constructor and indexed by the step index ``i``. It is never mutated afterwards, so one
instance can serve many threads; everything a single denoising call accumulates (history of model outputs,
the Heun half-step, PNDM's counter) lives in the object ``init_state`` returns.

The pipeline loop::

    b = sched.begin_index(strength)            # 0 for txt2img
    state = sched.init_state(b)
    for i in range(b, len(sched.timesteps)):
        x_in = sched.scale_model_input(x, i)
        eps = unet(x_in, np.float32(sched.timesteps[i]))
        x = sched.step(state, i, eps, x, rng)
"""

from __future__ import annotations

import numpy as np

from sdrt.errors import UserError

from ._config import Config, alpha_sigma, f32


class Scheduler:
    """Base class. Subclasses fill the tables in ``__init__`` and implement ``step``."""

    name: str = ""
    order: int = 1  # UNet calls per step as diffusers counts them (heun: 2); scales img2img's begin index
    stochastic: bool = False  # ``step`` draws noise from ``rng`` (ddpm, euler_a, lcm), so rng must not be None

    def __init__(self, cfg: Config, num_inference_steps: int):
        self.config = cfg
        self.num_inference_steps = num_inference_steps
        self.timesteps: np.ndarray = np.zeros(0, dtype=np.int64)
        self.init_noise_sigma: float = 1.0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} steps={self.num_inference_steps} calls={len(self.timesteps)}>"

    # -- img2img -------------------------------------------------------------------------------------------------

    def begin_index(self, strength: float) -> int:
        """First step index for img2img at ``strength``, as diffusers' Img2Img pipelines compute it.

        ``t_start = n - min(int(n * strength), n)``; the loop starts at ``t_start * order``.
        """
        strength = float(strength)
        if not 0.0 < strength <= 1.0:
            raise UserError(f"strength {strength} is out of range; use a value in (0, 1]")
        n = self.num_inference_steps
        denoise = min(int(n * strength), n)
        if denoise < 1:
            raise UserError(
                f"strength {strength} with {n} steps leaves no step to run; raise the strength or the step count"
            )
        return (n - denoise) * self.order

    def _cutoff(self, fraction: float) -> int:
        """The training timestep at ``fraction`` of the way from noise to image (diffusers'
        ``discrete_timestep_cutoff``)."""
        train = int(self.config["num_train_timesteps"])
        return int(round(train - fraction * train))

    def start_index(self, denoising_start: float) -> int:
        """First step index of a pipeline handed latents ``denoising_start`` of the way through (SDXL's refiner
        after a base run with ``denoising_end``), as diffusers' SDXL Img2Img pipeline computes it: the steps below
        the cutoff, one more for a second-order scheduler whose count would split a step."""
        n = int((np.asarray(self.timesteps) < self._cutoff(denoising_start)).sum())
        if self.order == 2 and n % 2 == 0:
            n += 1
        if n < 1:
            raise UserError(f"denoising_start {denoising_start:g} with {self.num_inference_steps} steps leaves no "
                            "step to run; lower it or raise the step count")
        return len(self.timesteps) - n

    def end_index(self, denoising_end: float, begin: int = 0) -> int:
        """One past the last step index when stopping ``denoising_end`` of the way (diffusers' SDXL pipelines:
        the steps from ``begin`` whose timestep is at or above the cutoff)."""
        end = begin + int((np.asarray(self.timesteps[begin:]) >= self._cutoff(denoising_end)).sum())
        if end <= begin:
            raise UserError(f"denoising_end {denoising_end:g} with {self.num_inference_steps} steps leaves no step "
                            "to run; raise it or the step count")
        return end

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """Noise ``original`` to the level the schedule has at step ``i``."""
        raise NotImplementedError

    # -- the loop ------------------------------------------------------------------------------------------------

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample

    def init_state(self, begin_index: int = 0) -> object:
        return _State(begin_index)

    def step(self, state, i: int, model_output: np.ndarray, sample: np.ndarray, rng=None) -> np.ndarray:
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------------------------------------

    def _noise(self, rng, shape) -> np.ndarray:
        if rng is None:
            raise ValueError(f"scheduler {self.name!r} draws noise at each step: pass a TorchCPUGenerator as rng")
        return rng.randn(shape)


class _State:
    """Per-call mutable state. Subclasses add what they need as attributes."""

    def __init__(self, begin_index: int):
        self.begin_index = begin_index
        self.steps_done = 0


class AlphaNoising:
    """add_noise for schedulers indexed by integer timestep: sqrt(a_bar) x0 + sqrt(1 - a_bar) noise."""

    alphas_cumprod: np.ndarray
    timesteps: np.ndarray

    def add_noise(self, original, noise, i):
        a = self.alphas_cumprod[int(self.timesteps[i])]
        return np.sqrt(a) * original + np.sqrt(f32(1) - a) * noise


class SigmaNoising:
    """add_noise for k-diffusion-style schedulers: x0 + sigma noise, at the sigma of step ``i``."""

    sigmas: np.ndarray

    def add_noise(self, original, noise, i):
        return original + noise * self.sigmas[i]


class VPSigmaNoising:
    """add_noise for DPM-Solver/UniPC: alpha_t x0 + sigma_t noise at the sigma of step ``i``."""

    sigmas: np.ndarray

    def add_noise(self, original, noise, i):
        alpha_t, sigma_t = alpha_sigma(self.sigmas[i])
        return alpha_t * original + sigma_t * noise
