"""Multistep exponential-integrator solvers in half-log-SNR time: DPM-Solver++(2M) and UniPC.

Both convert the model output to a data prediction x0 (or noise prediction), keep the last few, and step
x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) x0 + higher-order corrections, with h = lambda_t - lambda_s.
The coefficients of every step, for every order the step may run at, are float32 scalars computed in the
constructor in diffusers' operation order; the order a step actually runs at depends on how many steps this
call has taken (warm-up, also after an img2img start) and is read from the state.
"""

from __future__ import annotations

import math

import numpy as np

from sdrt.errors import UserError

from ._config import (Config, alpha_sigma, alphas_cumprod, exp32, expm1_32, f32, karras_bounds, karras_sigmas,
                      lambda32, log32, sigma_to_t, spaced_timesteps_multistep, train_sigmas)
from .base import Scheduler, VPSigmaNoising, _State


class _MultistepState(_State):
    def __init__(self, begin_index: int):
        super().__init__(begin_index)
        self.model_outputs: list[np.ndarray] = []  # newest last
        self.lower_order_nums = 0
        self.last_sample = None
        self.this_order = 0


class _Multistep(VPSigmaNoising, Scheduler):
    def __init__(self, cfg: Config, num_inference_steps: int):
        super().__init__(cfg, num_inference_steps)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # the tables divide by h and log-SNR, which are infinite at a zero final sigma, on purpose
            self._build(cfg, num_inference_steps)

    def _build(self, cfg: Config, num_inference_steps: int) -> None:
        raise NotImplementedError

    def init_state(self, begin_index: int = 0):
        return _MultistepState(begin_index)

    def _schedule(self, cfg: Config, n: int, last_timestep: int, round_karras: bool) -> None:
        table = alphas_cumprod(cfg, zero_snr_floor=True)
        train = train_sigmas(table)
        timesteps = spaced_timesteps_multistep(cfg, n, last_timestep)
        if cfg.get("use_karras_sigmas"):
            lo, hi = karras_bounds(cfg, train[::-1])
            sigmas = karras_sigmas(lo, hi, n)
            timesteps = sigma_to_t(sigmas, np.log(train))
            if round_karras:
                timesteps = timesteps.round()
            last = sigmas[-1] if self.karras_last_is_min else None
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
            last = None
        if cfg["final_sigmas_type"] == "zero":
            last = 0.0
        elif last is None:
            last = np.sqrt((f32(1) - table[0]) / table[0])
        self.sigmas = np.concatenate([sigmas, [last]]).astype(f32)
        self.timesteps = np.asarray(timesteps).astype(np.int64)
        if np.any(self.sigmas[1:-1] == self.sigmas[:-2]):
            raise UserError(
                f"{self.name}: {n} steps with timestep_spacing={cfg['timestep_spacing']!r} repeat a timestep, where "
                f"this solver's step size is zero (diffusers returns NaN); use fewer steps"
            )
        self.alphas_cumprod = table
        self.alpha_t, self.sigma_t = np.array([alpha_sigma(s) for s in self.sigmas], dtype=f32).T
        self.lambdas = np.array([lambda32(s) for s in self.sigmas], dtype=f32)

    def _convert(self, model_output, sample, i: int, predict_x0: bool = True):
        """The data prediction x0 (or, for UniPC with predict_x0 false, the noise prediction) at step i."""
        kind, alpha_t, sigma_t = self.config["prediction_type"], self.alpha_t[i], self.sigma_t[i]
        if predict_x0:
            if kind == "epsilon":
                return (sample - sigma_t * model_output) / alpha_t
            if kind == "v_prediction":
                return alpha_t * sample - sigma_t * model_output
            return model_output
        if kind == "epsilon":
            return model_output
        if kind == "v_prediction":
            return alpha_t * model_output + sigma_t * sample
        return (sample - alpha_t * model_output) / sigma_t


class DPMSolverPP2M(_Multistep):
    """Lu et al. 2022, DPM-Solver++(2M) (Algorithm 2), first order at the first and (by default) last step."""

    name = "dpmpp_2m"
    karras_last_is_min = False

    def _build(self, cfg: Config, num_inference_steps: int) -> None:
        if cfg["algorithm_type"] != "dpmsolver++" or int(cfg["solver_order"]) != 2:
            raise UserError("dpmpp_2m: only algorithm_type='dpmsolver++' with solver_order=2 is supported")
        solver_type = _solver_type(cfg, ("midpoint", "heun"), ("logrho", "bh1", "bh2"), "midpoint")
        train = int(cfg["num_train_timesteps"])
        clipped = 0
        if cfg["lambda_min_clipped"] != -math.inf:
            table = alphas_cumprod(cfg, zero_snr_floor=True)
            lambda_train = np.array([log32(np.sqrt(a)) - log32(np.sqrt(f32(1) - a)) for a in table], dtype=f32)
            clipped = int(np.searchsorted(lambda_train[::-1], cfg["lambda_min_clipped"]))
        self._schedule(cfg, num_inference_steps, train - clipped, cfg["beta_schedule"] != "squaredcos_cap_v2")
        n = len(self.timesteps)
        # x_t = c_sample * x - c_first * D0 [- c_second * D1], D1 = inv_r0 * (D0 - D0_prev)
        self.c_sample = np.zeros(n, dtype=f32)
        self.c_first = np.zeros(n, dtype=f32)
        self.c_second = np.zeros(n, dtype=f32)
        self.inv_r0 = np.zeros(n, dtype=f32)
        for i in range(n):
            h = f32(self.lambdas[i + 1] - self.lambdas[i])
            self.c_sample[i] = self.sigma_t[i + 1] / self.sigma_t[i]
            phi = exp32(-h) - f32(1)
            self.c_first[i] = self.alpha_t[i + 1] * phi
            if solver_type == "midpoint":
                self.c_second[i] = f32(0.5) * self.c_first[i]
            else:  # heun: + alpha_t ((e^{-h} - 1)/h + 1) D1, stored negated
                self.c_second[i] = -(self.alpha_t[i + 1] * (phi / h + f32(1)))
            if i > 0:
                r0 = f32(self.lambdas[i] - self.lambdas[i - 1]) / h
                self.inv_r0[i] = f32(1) / r0
        # diffusers: the last step is first order with euler_at_final, with lower_order_final under 15 steps,
        # and always when the final sigma is zero (the second-order term would divide by h = inf)
        self._last = n - 1
        self.first_order_at_last = (
            bool(cfg["euler_at_final"]) or (bool(cfg["lower_order_final"]) and n < 15)
            or cfg["final_sigmas_type"] == "zero"
        )

    def step(self, state: _MultistepState, i, model_output, sample, rng=None):
        x0 = self._convert(model_output, sample, i)
        state.model_outputs = state.model_outputs[-1:] + [x0]
        first_order = state.lower_order_nums < 1 or (i == self._last and self.first_order_at_last)
        state.lower_order_nums = min(state.lower_order_nums + 1, 2)
        prev = self.c_sample[i] * sample - self.c_first[i] * x0
        if first_order:
            return prev
        d1 = self.inv_r0[i] * (x0 - state.model_outputs[0])
        return prev - self.c_second[i] * d1


class UniPC(_Multistep):
    """Zhao et al. 2023, UniPC: UniP-p predictor with UniC corrector (B(h) = e^h - 1 for bh2, h for bh1)."""

    name = "unipc"
    karras_last_is_min = True

    def _build(self, cfg: Config, num_inference_steps: int) -> None:
        self.solver_order = int(cfg["solver_order"])
        if self.solver_order < 1:
            raise UserError(f"unipc: solver_order={self.solver_order} must be at least 1")
        self.predict_x0 = bool(cfg["predict_x0"])
        self.bh1 = _solver_type(cfg, ("bh1", "bh2"), ("midpoint", "heun", "logrho"), "bh2") == "bh1"
        self.disable_corrector = {int(k) for k in (cfg["disable_corrector"] or ())}
        self._schedule(cfg, num_inference_steps, int(cfg["num_train_timesteps"]), True)
        if not self.predict_x0 and self.sigmas[-1] == 0:
            raise UserError("unipc: predict_x0=false needs final_sigmas_type='sigma_min' (at a zero final sigma the "
                            "noise-prediction update is 0 * inf; diffusers returns NaN)")
        n = len(self.timesteps)
        self.lower_order_final = bool(cfg["lower_order_final"])
        # coefficient tables: [i][order] -> tuple, for the predictor at i and the corrector at i
        self.pred = [{p: self._coefficients(i + 1, i, p, corrector=False) for p in range(1, self.solver_order + 1)
                      if i - (p - 1) >= 0} for i in range(n)]
        self.corr = [{p: self._coefficients(i, i - 1, p, corrector=True) for p in range(1, self.solver_order + 1)
                      if i - p >= 0} for i in range(n)]

    def _coefficients(self, t: int, s0: int, order: int, corrector: bool):
        """(c_sample, c_m0, c_res, rks, rhos) for an update from sigma index s0 to t using ``order`` outputs."""
        alpha_t, sigma_t = self.alpha_t[t], self.sigma_t[t]
        alpha_s0, sigma_s0 = self.alpha_t[s0], self.sigma_t[s0]
        lambda_s0 = self.lambdas[s0]
        h = f32(self.lambdas[t] - lambda_s0)
        rks = [f32(self.lambdas[s0 - k] - lambda_s0) / h for k in range(1, order)] + [f32(1)]
        hh = -h if self.predict_x0 else h
        h_phi_1 = expm1_32(hh)
        h_phi_k = h_phi_1 / hh - f32(1)
        b_h = hh if self.bh1 else expm1_32(hh)
        factorial = 1
        b = []
        for k in range(1, order + 1):
            b.append(f32(h_phi_k * f32(factorial)) / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - f32(1 / factorial)
        r = np.array([[float(rk) ** (k - 1) for rk in rks] for k in range(1, order + 1)])
        b64 = np.array(b, dtype=np.float64)
        try:
            if corrector:
                rhos = [f32(0.5)] if order == 1 else list(np.linalg.solve(r, b64).astype(f32))
            elif order == 1:
                rhos = []
            elif order == 2:
                rhos = [f32(0.5)]
            else:
                rhos = list(np.linalg.solve(r[:-1, :-1], b64[:-1]).astype(f32))
        except np.linalg.LinAlgError:  # only at sigma_t = 0, where lower_order_final keeps this order unused
            rhos = [f32(np.nan)] * (order if corrector else order - 1)
        if self.predict_x0:
            c_sample, c_m0, c_res = sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * b_h
        else:
            c_sample, c_m0, c_res = alpha_t / alpha_s0, sigma_t * h_phi_1, sigma_t * b_h
        return f32(c_sample), f32(c_m0), f32(c_res), rks[:-1], rhos

    def step(self, state: _MultistepState, i, model_output, sample, rng=None):
        m = self._convert(model_output, sample, i, self.predict_x0)
        if i > 0 and (i - 1) not in self.disable_corrector and state.last_sample is not None:
            sample = self._correct(state, i, m, sample)
        state.model_outputs = state.model_outputs[-(self.solver_order - 1):] + [m] if self.solver_order > 1 else [m]
        order = min(self.solver_order, len(self.timesteps) - i) if self.lower_order_final else self.solver_order
        state.this_order = min(order, state.lower_order_nums + 1)
        state.last_sample = sample
        state.lower_order_nums = min(state.lower_order_nums + 1, self.solver_order)
        return self._predict(state, i, sample)

    def _predict(self, state, i, x):
        """UniP: x_t = c_sample x - c_m0 m0 - c_res sum_k rho_k D1_k."""
        c_sample, c_m0, c_res, rks, rhos = self.pred[i][state.this_order]
        outputs = state.model_outputs
        m0 = outputs[-1]
        x_t = c_sample * x - c_m0 * m0
        if rhos:
            d1s = [(outputs[-(k + 2)] - m0) / rk for k, rk in enumerate(rks)]
            x_t = x_t - c_res * _weighted_sum(rhos, d1s)
        return x_t

    def _correct(self, state, i, model_t, x_t):
        """UniC: recompute the previous update with the new model output at its end point."""
        c_sample, c_m0, c_res, rks, rhos = self.corr[i][state.this_order]
        outputs = state.model_outputs  # not yet holding model_t
        m0 = outputs[-1]
        x_t_ = c_sample * state.last_sample - c_m0 * m0
        d1_t = model_t - m0
        if rks:
            d1s = [(outputs[-(k + 2)] - m0) / rk for k, rk in enumerate(rks)]
            res = _weighted_sum(rhos[:-1], d1s) + rhos[-1] * d1_t
        else:
            res = rhos[-1] * d1_t
        return x_t_ - c_res * res


def _solver_type(cfg: Config, own: tuple, mapped: tuple, default: str) -> str:
    """diffusers maps the other solver family's solver_type names to its default and refuses anything else."""
    value = cfg["solver_type"]
    if value in own:
        return value
    if value in mapped:
        return default
    raise UserError(f"{cfg.class_name}: solver_type={value!r} is not supported; supported: {', '.join(own)}")


def _weighted_sum(weights, arrays):
    total = weights[0] * arrays[0]
    for w, a in zip(weights[1:], arrays[1:]):
        total = total + w * a
    return total
