"""k-diffusion-style samplers over a sigma schedule: Euler, Euler ancestral, Heun, LMS.

The model's output is turned into a denoised estimate D(x, sigma); each sampler is a few lines over the
precomputed ``sigmas`` (one per UNet call, plus the final sigma). Inputs to the UNet are scaled by
1/sqrt(sigma^2 + 1) (Karras et al. 2022, Table 1, "VP" preconditioning of a discrete-time model).
"""

from __future__ import annotations

import numpy as np

from sdrt.errors import UserError

from ._config import (Config, alphas_cumprod, f32, karras_bounds, karras_sigmas, sigma_to_t, spaced_timesteps_float,
                      train_sigmas)
from .base import Scheduler, SigmaNoising, _State


def sigma_schedule(cfg: Config, n: int, *, karras_from_config: bool = True) -> tuple[np.ndarray, ...]:
    """(timesteps, sigmas without the final entry (float64), alphas_cumprod) for the discrete k-samplers."""
    table = alphas_cumprod(cfg, zero_snr_floor=True)
    timesteps = spaced_timesteps_float(cfg, n)
    train = train_sigmas(table)
    sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
    if cfg.get("use_karras_sigmas"):
        if karras_from_config:
            lo, hi = karras_bounds(cfg, sigmas)
        else:
            lo, hi = float(sigmas[-1]), float(sigmas[0])
        sigmas = karras_sigmas(lo, hi, n)
        timesteps = sigma_to_t(sigmas, np.log(train))
    return timesteps, sigmas, table


class _SigmaScheduler(SigmaNoising, Scheduler):
    def _finish(self, timesteps: np.ndarray, sigmas: np.ndarray, table: np.ndarray) -> None:
        """Store the per-call tables and the quantities every step uses."""
        self.alphas_cumprod = table
        self.timesteps = np.asarray(timesteps, dtype=f32)
        self.sigmas = np.asarray(sigmas, dtype=f32)
        top = self.sigmas.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            self.init_noise_sigma = float(top)
        else:
            self.init_noise_sigma = float(np.sqrt(top * top + f32(1)))
        s = self.sigmas
        self.sigma2p1 = s * s + f32(1)
        self.input_scale = np.sqrt(self.sigma2p1)
        # v-prediction: D(x) = v * (-sigma / sqrt(sigma^2+1)) + x / (sigma^2+1)   (Salimans & Ho 2022)
        self.v_out = -s / self.input_scale

    def scale_model_input(self, sample, i):
        return sample / self.input_scale[i]

    def _denoised(self, model_output, sample, j: int):
        """D(x, sigma_j) for the model's prediction type, at table index j."""
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return sample - self.sigmas[j] * model_output
        if kind == "v_prediction":
            return model_output * self.v_out[j] + sample / self.sigma2p1[j]
        return model_output


class Euler(_SigmaScheduler):
    """Karras et al. 2022, Algorithm 2 without churn: x += (x - D(x)) / sigma * (sigma_next - sigma)."""

    name = "euler"

    def __init__(self, cfg: Config, num_inference_steps: int):
        super().__init__(cfg, num_inference_steps)
        timesteps, sigmas, table = sigma_schedule(cfg, num_inference_steps)
        last = np.sqrt((f32(1) - table[0]) / table[0]) if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        self._finish(timesteps, np.concatenate([sigmas, [last]]), table)
        self.dt = self.sigmas[1:] - self.sigmas[:-1]

    def step(self, state, i, model_output, sample, rng=None):
        derivative = (sample - self._denoised(model_output, sample, i)) / self.sigmas[i]
        return sample + derivative * self.dt[i]


class EulerAncestral(_SigmaScheduler):
    """k-diffusion ``sample_euler_ancestral`` (eta = 1): Euler to sigma_down, then fresh noise of size sigma_up."""

    name = "euler_a"
    stochastic = True

    def __init__(self, cfg: Config, num_inference_steps: int):
        super().__init__(cfg, num_inference_steps)
        if cfg["prediction_type"] == "sample":
            raise UserError("euler_a: prediction_type='sample' is not supported (nor is it by diffusers)")
        timesteps, sigmas, table = sigma_schedule(cfg, num_inference_steps)
        self._finish(timesteps, np.concatenate([sigmas, [0.0]]), table)
        s_from, s_to = self.sigmas[:-1], self.sigmas[1:]
        s_from2, s_to2 = s_from * s_from, s_to * s_to
        self.sigma_up = np.sqrt(s_to2 * (s_from2 - s_to2) / s_from2)
        self.dt = np.sqrt(s_to2 - self.sigma_up * self.sigma_up) - s_from  # sigma_down - sigma

    def step(self, state, i, model_output, sample, rng=None):
        derivative = (sample - self._denoised(model_output, sample, i)) / self.sigmas[i]
        prev = sample + derivative * self.dt[i]
        return prev + self._noise(rng, model_output.shape) * self.sigma_up[i]


class _HeunState(_State):
    def __init__(self, begin_index: int):
        super().__init__(begin_index)
        self.prev_derivative = None
        self.dt = None
        self.sample = None


class Heun(_SigmaScheduler):
    """Karras et al. 2022, Algorithm 1 (Heun's 2nd order method), the last step plain Euler to sigma = 0.

    Two UNet calls per step except the first: ``timesteps`` and ``sigmas`` repeat each inner entry, so a call
    at an even offset from the start is an Euler predictor and the following call its trapezoidal corrector.
    """

    name = "heun"
    order = 2

    def __init__(self, cfg: Config, num_inference_steps: int):
        super().__init__(cfg, num_inference_steps)
        timesteps, sigmas, table = sigma_schedule(cfg, num_inference_steps)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(f32)
        sigmas = np.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]])
        timesteps = np.concatenate([timesteps[:1], timesteps[1:].repeat(2)])
        self._finish(timesteps, sigmas, table)
        self.clip = float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None

    def init_state(self, begin_index: int = 0):
        return _HeunState(begin_index)

    def step(self, state: _HeunState, i, model_output, sample, rng=None):
        predictor = state.prev_derivative is None
        # the corrector evaluates the model at sigma_next, which is sigmas[i] (the repeated entry)
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if predictor else (self.sigmas[i - 1], self.sigmas[i])
        denoised = self._denoised(model_output, sample, i)
        if self.clip is not None:
            denoised = np.clip(denoised, -self.clip, self.clip)
        if predictor:
            derivative = (sample - denoised) / sigma
            state.prev_derivative, state.dt, state.sample = derivative, sigma_next - sigma, sample
            return sample + derivative * state.dt
        derivative = (sample - denoised) / sigma_next
        derivative = (state.prev_derivative + derivative) / f32(2)
        prev = state.sample + derivative * state.dt
        state.prev_derivative = state.sample = None
        return prev


class _LMSState(_State):
    def __init__(self, begin_index: int):
        super().__init__(begin_index)
        self.derivatives: list[np.ndarray] = []


class LMS(_SigmaScheduler):
    """k-diffusion ``sample_lms``: linear multistep of order up to 4, coefficients by integrating the Lagrange
    basis over [sigma_i, sigma_i+1] (exact Gauss-Legendre quadrature; diffusers uses scipy's quad)."""

    name = "lms"
    max_order = 4

    def __init__(self, cfg: Config, num_inference_steps: int):
        super().__init__(cfg, num_inference_steps)
        timesteps, sigmas, table = sigma_schedule(cfg, num_inference_steps, karras_from_config=False)
        self._finish(timesteps, np.concatenate([sigmas, [0.0]]), table)
        self.coeffs = _lms_coefficients(self.sigmas.astype(np.float64), self.max_order)

    def init_state(self, begin_index: int = 0):
        return _LMSState(begin_index)

    def step(self, state: _LMSState, i, model_output, sample, rng=None):
        derivative = (sample - self._denoised(model_output, sample, i)) / self.sigmas[i]
        state.derivatives = state.derivatives[-(self.max_order - 1):] + [derivative]
        update = None
        for coeff, d in zip(self.coeffs[i], reversed(state.derivatives)):
            update = coeff * d if update is None else update + coeff * d
        return sample + update


def _lms_coefficients(s: np.ndarray, max_order: int) -> list[np.ndarray]:
    """Per step i, the integrals over [s_i, s_i+1] of the Lagrange basis polynomials on s_i, s_i-1, ... .

    The order is min(i + 1, max_order), picked from the step index as diffusers does (not from how many
    derivatives the call holds). The basis has degree <= 3, so 3-point Gauss-Legendre quadrature is exact.
    """
    n = len(s) - 1
    nodes, weights = np.polynomial.legendre.leggauss(3)
    i = np.arange(n)
    order = np.minimum(i + 1, max_order)
    hist = np.maximum(i[:, None] - np.arange(max_order)[None, :], 0)  # [i, k] -> i - k
    s_hist = s[hist]  # (n, K)
    x = (s[i] + s[i + 1])[:, None] / 2 + (s[i + 1] - s[i])[:, None] / 2 * nodes[None, :]  # (n, Q)
    valid = np.arange(max_order)[None, :] < order[:, None]  # (n, K)
    out = []
    basis = np.ones((n, max_order, len(nodes)))  # [i, j, q]
    for j in range(max_order):
        for k in range(max_order):
            if k == j:
                continue
            use = (valid[:, j] & valid[:, k])[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                factor = (x - s_hist[:, k, None]) / (s_hist[:, j, None] - s_hist[:, k, None])
            basis[:, j, :] *= np.where(use, factor, 1.0)
    integrals = (s[i + 1] - s[i])[:, None] / 2 * (basis * weights[None, None, :]).sum(axis=2)  # (n, K)
    for step in range(n):
        out.append(integrals[step, : order[step]].astype(f32))
    return out
