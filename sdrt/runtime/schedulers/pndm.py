"""PNDM: Liu et al. 2022, pseudo numerical methods for diffusion models (PRK warm-up, then PLMS).

Which rule a step uses depends on how many steps this call has taken (diffusers' ``counter``), not on the
step index: an img2img call that starts part-way still begins with the warm-up. So the per-step plan (the pair
of timesteps each update moves between, and its coefficients) is built for a begin index: the constructor
builds the txt2img plan, ``init_state`` builds another only when an img2img call starts elsewhere.
"""

from __future__ import annotations

import numpy as np

from sdrt.errors import UserError

from ._config import Config, alphas_cumprod, f32
from .base import AlphaNoising, Scheduler, _State

_PRK_STEPS = 12  # 4 Runge-Kutta steps of 3 extra model calls: diffusers' pndm_order 4


class _Plan:
    """Per-step float32 coefficients of ``x_prev = c_sample * x - (c_diff * e) / c_denom``."""

    def __init__(self, n: int):
        self.c_sample = np.zeros(n, dtype=f32)
        self.c_diff = np.zeros(n, dtype=f32)
        self.c_denom = np.zeros(n, dtype=f32)
        self.sqrt_a = np.zeros(n, dtype=f32)
        self.sqrt_b = np.zeros(n, dtype=f32)


class _PNDMState(_State):
    def __init__(self, begin_index: int, plan: _Plan):
        super().__init__(begin_index)
        self.plan = plan
        self.ets: list[np.ndarray] = []
        self.cur_model_output = None
        self.cur_sample = None


class PNDM(AlphaNoising, Scheduler):
    name = "pndm"

    def __init__(self, cfg: Config, num_inference_steps: int):
        super().__init__(cfg, num_inference_steps)
        if cfg["prediction_type"] == "sample":
            raise UserError("pndm: prediction_type='sample' is not supported (diffusers' PNDM has no such mode)")
        n, train = num_inference_steps, int(cfg["num_train_timesteps"])
        self.alphas_cumprod = alphas_cumprod(cfg)
        self.final_alpha = f32(1.0) if cfg["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.stride = train // n
        spacing = cfg["timestep_spacing"]
        if spacing == "linspace":
            ascending = np.linspace(0, train - 1, n).round().astype(np.int64)
        elif spacing == "leading":
            ascending = (np.arange(0, n) * self.stride).round().astype(np.int64) + int(cfg["steps_offset"])
        else:
            ascending = np.round(np.arange(train, 0, -train / n))[::-1].astype(np.int64) - 1
        self.skip_prk = bool(cfg["skip_prk_steps"])
        if self.skip_prk:
            self.n_prk = 0
            plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
            self.timesteps = plms.astype(np.int64)
        else:
            if n < 4:
                raise UserError(f"pndm with PRK warm-up (skip_prk_steps false) needs at least 4 steps, got {n}")
            half = self.stride // 2
            prk = ascending[-4:].repeat(2) + np.tile(np.array([0, half]), 4)
            prk = prk[:-1].repeat(2)[1:-1][::-1]
            self.prk_timesteps = prk.astype(np.int64)
            self.n_prk = len(prk)
            self.timesteps = np.concatenate([prk, ascending[:-3][::-1]]).astype(np.int64)
        self._plan0 = self._plan(0)

    # ---- plan -------------------------------------------------------------------------------------------------

    def _step_timesteps(self, i: int, counter: int) -> tuple[int, int]:
        """(t, t_prev) the update at index i moves between, the ``counter``-th step of its call."""
        t = int(self.timesteps[i])
        if counter < self.n_prk:
            prev_t = t - (0 if counter % 2 else self.stride // 2)
            return int(self.prk_timesteps[counter // 4 * 4]), prev_t
        if counter == 1:  # skip_prk only: redo the first step with the averaged output
            return t + self.stride, t
        return t, t - self.stride

    def _plan(self, begin: int) -> _Plan:
        plan = _Plan(len(self.timesteps))
        train = len(self.alphas_cumprod)
        for i in range(begin, len(self.timesteps)):
            t, prev_t = self._step_timesteps(i, i - begin)
            if not 0 <= t < train or prev_t >= train:
                raise UserError(
                    f"pndm: {self.num_inference_steps} steps with these spacing settings reach timestep {t}, "
                    f"outside the {train} training timesteps"
                )
            a_t = self.alphas_cumprod[t]
            a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha
            b_t, b_prev = f32(1) - a_t, f32(1) - a_prev
            plan.c_sample[i] = np.sqrt(a_prev / a_t)
            plan.c_diff[i] = a_prev - a_t
            plan.c_denom[i] = a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev)
            plan.sqrt_a[i], plan.sqrt_b[i] = np.sqrt(a_t), np.sqrt(b_t)
        return plan

    def init_state(self, begin_index: int = 0):
        return _PNDMState(begin_index, self._plan0 if begin_index == 0 else self._plan(begin_index))

    # ---- step -------------------------------------------------------------------------------------------------

    def _update(self, plan: _Plan, i: int, sample, e):
        """Eq. 11 of the paper (the transfer part phi): DDIM-like move along the predicted noise ``e``."""
        if self.config["prediction_type"] == "v_prediction":
            e = plan.sqrt_a[i] * e + plan.sqrt_b[i] * sample
        return plan.c_sample[i] * sample - (plan.c_diff[i] * e) / plan.c_denom[i]

    def step(self, state: _PNDMState, i, model_output, sample, rng=None):
        c = state.steps_done
        state.steps_done += 1
        if c < self.n_prk:
            return self._step_prk(state, i, c, model_output, sample)
        return self._step_plms(state, i, c, model_output, sample)

    def _step_prk(self, state, i, c, e, sample):
        """Runge-Kutta warm-up: model outputs at t, t-h/2 (twice) and t-h, weighted 1/6, 1/3, 1/3, 1/6."""
        phase = c % 4
        if phase == 0:
            state.cur_model_output = f32(1 / 6) * e
            state.ets.append(e)
            state.cur_sample = sample
        elif phase in (1, 2):
            state.cur_model_output = state.cur_model_output + f32(1 / 3) * e
        else:
            e = state.cur_model_output + f32(1 / 6) * e
            state.cur_model_output = None
        return self._update(state.plan, i, state.cur_sample, e)

    def _step_plms(self, state, i, c, e, sample):
        """Linear multistep (Adams-Bashforth) over the last up to four noise predictions."""
        if c != 1:
            state.ets = state.ets[-3:] + [e]
        ets = state.ets
        if len(ets) == 1 and c == 0:
            state.cur_sample = sample
        elif len(ets) == 1 and c == 1:
            e = (e + ets[-1]) / f32(2)
            sample, state.cur_sample = state.cur_sample, None
        elif len(ets) == 2:
            e = (f32(3) * ets[-1] - ets[-2]) / f32(2)
        elif len(ets) == 3:
            e = (f32(23) * ets[-1] - f32(16) * ets[-2] + f32(5) * ets[-3]) / f32(12)
        else:
            e = f32(1 / 24) * (f32(55) * ets[-1] - f32(59) * ets[-2] + f32(37) * ets[-3] - f32(9) * ets[-4])
        return self._update(state.plan, i, sample, e)
