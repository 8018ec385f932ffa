"""Schedulers that step between integer training timesteps through alpha_bar: DDIM, DDPM, LCM.

Each step predicts the clean sample x0 and re-noises it to the previous timestep's level; they differ in how
(deterministically: DDIM; with posterior noise: DDPM; by consistency-model boundary scalings plus fresh noise:
LCM). Coefficients are float32 scalars computed in the constructor, in diffusers' operation order.
"""

from __future__ import annotations

import numpy as np

from sdrt.errors import UserError

from ._config import Config, alphas_cumprod, f32, spaced_timesteps
from .base import AlphaNoising, Scheduler


def _sqrt(x) -> np.float32:
    return np.sqrt(f32(x))


class _AlphaScheduler(AlphaNoising, Scheduler):
    def __init__(self, cfg: Config, num_inference_steps: int, timesteps: np.ndarray):
        super().__init__(cfg, num_inference_steps)
        self.alphas_cumprod = alphas_cumprod(cfg)
        train = len(self.alphas_cumprod)
        if len(timesteps) and (timesteps.max() >= train or timesteps.min() < 0):
            raise UserError(
                f"{num_inference_steps} steps with timestep_spacing={cfg['timestep_spacing']!r} and "
                f"steps_offset={cfg['steps_offset']} reach timestep {int(timesteps.max())}, past the "
                f"{train} training timesteps; use fewer steps"
            )
        self.timesteps = timesteps
        self.clip = float(cfg["clip_sample_range"]) if cfg.get("clip_sample") else None

    def _alpha(self, t: int, final: np.float32) -> np.float32:
        return self.alphas_cumprod[t] if t >= 0 else final

    def _x0(self, model_output, sample, sqrt_a, sqrt_b):
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            x0 = (sample - sqrt_b * model_output) / sqrt_a
        elif kind == "v_prediction":
            x0 = sqrt_a * sample - sqrt_b * model_output
        else:
            x0 = model_output
        if self.clip is not None:
            x0 = np.clip(x0, -self.clip, self.clip)
        return x0


class DDIM(_AlphaScheduler):
    """Song et al. 2020, DDIM, eq. 12 with eta = 0 (deterministic)."""

    name = "ddim"

    def __init__(self, cfg: Config, num_inference_steps: int):
        train = int(cfg["num_train_timesteps"])
        if num_inference_steps > train:
            raise UserError(f"ddim: {num_inference_steps} steps is more than the {train} training timesteps")
        super().__init__(cfg, num_inference_steps, spaced_timesteps(cfg, num_inference_steps))
        final = f32(1.0) if cfg["set_alpha_to_one"] else self.alphas_cumprod[0]
        # DDIM always steps back by train // n, whatever the spacing.
        stride = train // num_inference_steps
        a_t = np.array([self.alphas_cumprod[t] for t in self.timesteps], dtype=f32)
        a_prev = np.array([self._alpha(int(t) - stride, final) for t in self.timesteps], dtype=f32)
        self.sqrt_a = np.sqrt(a_t)
        self.sqrt_b = np.sqrt(f32(1) - a_t)
        self.sqrt_a_prev = np.sqrt(a_prev)
        self.sqrt_b_prev = np.sqrt(f32(1) - a_prev)

    def step(self, state, i, model_output, sample, rng=None):
        sqrt_a, sqrt_b = self.sqrt_a[i], self.sqrt_b[i]
        x0 = self._x0(model_output, sample, sqrt_a, sqrt_b)
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            eps = model_output
        elif kind == "v_prediction":
            eps = sqrt_a * model_output + sqrt_b * sample
        else:  # from the unclipped prediction, as diffusers does
            eps = (sample - sqrt_a * model_output) / sqrt_b
        return self.sqrt_a_prev[i] * x0 + self.sqrt_b_prev[i] * eps


class DDPM(_AlphaScheduler):
    """Ho et al. 2020, DDPM ancestral sampling (eq. 6-7), strided over the chosen timesteps."""

    name = "ddpm"
    stochastic = True

    def __init__(self, cfg: Config, num_inference_steps: int):
        train = int(cfg["num_train_timesteps"])
        if num_inference_steps > train:
            raise UserError(f"ddpm: {num_inference_steps} steps is more than the {train} training timesteps")
        super().__init__(cfg, num_inference_steps, spaced_timesteps(cfg, num_inference_steps))
        n = len(self.timesteps)
        self.coef_x0 = np.zeros(n, dtype=f32)
        self.coef_sample = np.zeros(n, dtype=f32)
        self.std = np.zeros(n, dtype=f32)
        self.sqrt_a = np.zeros(n, dtype=f32)
        self.sqrt_b = np.zeros(n, dtype=f32)
        for i, t in enumerate(self.timesteps):
            prev_t = int(self.timesteps[i + 1]) if i + 1 < n else -1
            a_t, a_prev = self.alphas_cumprod[t], self._alpha(prev_t, f32(1.0))
            b_t, b_prev = f32(1) - a_t, f32(1) - a_prev
            cur_a = a_t / a_prev
            cur_b = f32(1) - cur_a
            self.sqrt_a[i], self.sqrt_b[i] = _sqrt(a_t), _sqrt(b_t)
            self.coef_x0[i] = _sqrt(a_prev) * cur_b / b_t
            self.coef_sample[i] = _sqrt(cur_a) * b_prev / b_t
            if cfg["variance_type"] == "fixed_small":
                variance = max(b_prev / b_t * cur_b, f32(1e-20))
            else:
                variance = cur_b
            self.std[i] = _sqrt(variance) if t > 0 else f32(0)

    def step(self, state, i, model_output, sample, rng=None):
        x0 = self._x0(model_output, sample, self.sqrt_a[i], self.sqrt_b[i])
        prev = self.coef_x0[i] * x0 + self.coef_sample[i] * sample
        if self.timesteps[i] > 0:
            prev = prev + self.std[i] * self._noise(rng, model_output.shape)
        return prev


class LCM(_AlphaScheduler):
    """Luo et al. 2023, Latent Consistency Models: multistep consistency sampling (Algorithm 1)."""

    name = "lcm"
    stochastic = True

    def __init__(self, cfg: Config, num_inference_steps: int):
        original = int(cfg["original_inference_steps"])
        train = int(cfg["num_train_timesteps"])
        if original > train:
            raise UserError(f"lcm: original_inference_steps={original} is more than the {train} training timesteps")
        if num_inference_steps > original:
            raise UserError(
                f"lcm: {num_inference_steps} steps is more than original_inference_steps={original}; "
                f"use at most {original}"
            )
        k = train // original
        origin = (np.arange(1, original + 1) * k - 1)[::-1]
        picks = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
        super().__init__(cfg, num_inference_steps, origin[picks].astype(np.int64))
        final = f32(1.0) if cfg["set_alpha_to_one"] else self.alphas_cumprod[0]
        n = len(self.timesteps)
        self.sqrt_a, self.sqrt_b = np.zeros(n, dtype=f32), np.zeros(n, dtype=f32)
        self.sqrt_a_prev, self.sqrt_b_prev = np.zeros(n, dtype=f32), np.zeros(n, dtype=f32)
        self.c_skip, self.c_out = np.zeros(n, dtype=f32), np.zeros(n, dtype=f32)
        sigma_data2 = f32(0.25)  # sigma_data = 0.5
        for i, t in enumerate(self.timesteps):
            prev_t = int(self.timesteps[i + 1]) if i + 1 < n else int(t)
            a_t, a_prev = self.alphas_cumprod[t], self._alpha(prev_t, final)
            self.sqrt_a[i], self.sqrt_b[i] = _sqrt(a_t), _sqrt(f32(1) - a_t)
            self.sqrt_a_prev[i], self.sqrt_b_prev[i] = _sqrt(a_prev), _sqrt(f32(1) - a_prev)
            scaled = f32(t) * f32(cfg["timestep_scaling"])
            self.c_skip[i] = sigma_data2 / (scaled * scaled + sigma_data2)
            self.c_out[i] = scaled / _sqrt(scaled * scaled + sigma_data2)

    def step(self, state, i, model_output, sample, rng=None):
        x0 = self._x0(model_output, sample, self.sqrt_a[i], self.sqrt_b[i])
        denoised = self.c_out[i] * x0 + self.c_skip[i] * sample
        if i == self.num_inference_steps - 1:
            return denoised
        noise = self._noise(rng, model_output.shape)
        return self.sqrt_a_prev[i] * denoised + self.sqrt_b_prev[i] * noise
