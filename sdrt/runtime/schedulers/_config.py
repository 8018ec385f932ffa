"""Scheduler configuration and the tables every scheduler starts from.

A diffusers ``scheduler_config.json`` is read the way ``SchedulerClass.from_config(config)`` reads it: keys the
class's constructor takes are used, missing ones get that class's default, everything else is ignored (keys
listed in ``_use_default_values`` count as missing). Options whose non-default values we do not implement are
refused with a :class:`UserError` naming the key rather than silently computed differently.

The training tables (betas, alphas_cumprod) reproduce torch's float32 arithmetic bit for bit (linspace with
its fused multiply-adds; cumprod accumulating in double), because every later coefficient derives from them.
"""

from __future__ import annotations

import math

import numpy as np

from sdrt.errors import UserError
from sdrt.runtime.rng import fma_float32

f32 = np.float32

_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
}
_THRESHOLD = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_SIGMA_KINDS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}

# Constructor defaults of each diffusers class (diffusers 0.3x-0.4x), restricted to the keys that matter.
DEFAULTS: dict[str, dict] = {
    "DDIMScheduler": {**_COMMON, **_THRESHOLD, "clip_sample": True, "set_alpha_to_one": True,
                      "clip_sample_range": 1.0, "timestep_spacing": "leading", "rescale_betas_zero_snr": False},
    "PNDMScheduler": {**_COMMON, "skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading"},
    "DDPMScheduler": {**_COMMON, **_THRESHOLD, "variance_type": "fixed_small", "clip_sample": True,
                      "clip_sample_range": 1.0, "timestep_spacing": "leading", "rescale_betas_zero_snr": False},
    "LMSDiscreteScheduler": {**_COMMON, **_SIGMA_KINDS, "timestep_spacing": "linspace"},
    "EulerDiscreteScheduler": {**_COMMON, **_SIGMA_KINDS, "interpolation_type": "linear", "sigma_min": None,
                               "sigma_max": None, "timestep_spacing": "linspace", "timestep_type": "discrete",
                               "rescale_betas_zero_snr": False, "final_sigmas_type": "zero"},
    "EulerAncestralDiscreteScheduler": {**_COMMON, "timestep_spacing": "linspace", "rescale_betas_zero_snr": False},
    "HeunDiscreteScheduler": {**_COMMON, **_SIGMA_KINDS, "beta_start": 0.00085, "beta_end": 0.012,
                              "clip_sample": False, "clip_sample_range": 1.0, "timestep_spacing": "linspace"},
    "DPMSolverMultistepScheduler": {**_COMMON, **_THRESHOLD, **_SIGMA_KINDS, "solver_order": 2,
                                    "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                                    "lower_order_final": True, "euler_at_final": False, "use_lu_lambdas": False,
                                    "use_flow_sigmas": False, "final_sigmas_type": "zero",
                                    "lambda_min_clipped": -math.inf, "variance_type": None,
                                    "timestep_spacing": "linspace", "rescale_betas_zero_snr": False,
                                    "use_dynamic_shifting": False},
    "UniPCMultistepScheduler": {**_COMMON, **_THRESHOLD, **_SIGMA_KINDS, "solver_order": 2, "predict_x0": True,
                                "solver_type": "bh2", "lower_order_final": True, "disable_corrector": [],
                                "solver_p": None, "use_flow_sigmas": False, "timestep_spacing": "linspace",
                                "final_sigmas_type": "zero", "rescale_betas_zero_snr": False,
                                "use_dynamic_shifting": False, "sigma_min": None, "sigma_max": None,
                                "shift_terminal": None},
    "LCMScheduler": {**_COMMON, **_THRESHOLD, "beta_start": 0.00085, "beta_end": 0.012,
                     "beta_schedule": "scaled_linear", "original_inference_steps": 50, "clip_sample": False,
                     "clip_sample_range": 1.0, "set_alpha_to_one": True, "timestep_spacing": "leading",
                     "timestep_scaling": 10.0, "rescale_betas_zero_snr": False},
}

# Options we implement only at one value: key -> allowed values (the diffusers default first).
_ONLY = {
    "thresholding": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "solver_p": (None,),
    "shift_terminal": (None,),
    "interpolation_type": ("linear",),
    "variance_type": None,  # per class, below
}


class Config(dict):
    """A resolved scheduler config: the class's init keys, defaulted; ``raw`` keeps what the file said."""

    def __init__(self, class_name: str, values: dict, raw: dict):
        super().__init__(values)
        self.class_name = class_name
        self.raw = raw

    def hidden(self, key: str):
        """A key diffusers keeps on ``scheduler.config`` even when the class does not take it (``hasattr``)."""
        return self[key] if key in self else self.raw.get(key)


def resolve(class_name: str, config: dict, overrides: dict | None = None) -> Config:
    """What ``class_name.from_config(config, **overrides)`` would hand its constructor."""
    defaults = DEFAULTS[class_name]
    defaulted = set(config.get("_use_default_values") or ())
    values = dict(defaults)
    for key, value in config.items():
        if key in defaults and key not in defaulted:
            values[key] = value
    values.update(overrides or {})
    raw = {k: v for k, v in config.items() if k not in defaulted}
    cfg = Config(class_name, values, raw)
    _validate(cfg)
    return cfg


def _refuse(cfg: Config, key: str, allowed) -> None:
    choices = ", ".join(repr(a) for a in allowed)
    raise UserError(f"{cfg.class_name}: {key}={cfg[key]!r} is not supported by sdrt; supported: {choices}")


def _validate(cfg: Config) -> None:
    for key, allowed in _ONLY.items():
        if key in cfg and allowed is not None and cfg[key] not in allowed:
            _refuse(cfg, key, allowed)
    if cfg["trained_betas"] is None and cfg["beta_schedule"] not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        _refuse(cfg, "beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"))
    if cfg["timestep_spacing"] not in ("leading", "trailing", "linspace"):
        _refuse(cfg, "timestep_spacing", ("leading", "trailing", "linspace"))
    if cfg["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
        _refuse(cfg, "prediction_type", ("epsilon", "v_prediction", "sample"))
    if "final_sigmas_type" in cfg and cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
        _refuse(cfg, "final_sigmas_type", ("zero", "sigma_min"))
    if cfg.class_name == "DDPMScheduler" and cfg["variance_type"] not in ("fixed_small", "fixed_large"):
        _refuse(cfg, "variance_type", ("fixed_small", "fixed_large"))
    if cfg.class_name == "DPMSolverMultistepScheduler" and cfg["variance_type"] is not None:
        _refuse(cfg, "variance_type", (None,))
    if cfg.class_name == "EulerDiscreteScheduler" and cfg["timestep_type"] == "continuous" \
            and cfg["prediction_type"] == "v_prediction":
        _refuse(cfg, "timestep_type", ("discrete",))
    if int(cfg["num_train_timesteps"]) < 2:
        _refuse(cfg, "num_train_timesteps", ("an integer >= 2",))


# ---- training tables -------------------------------------------------------------------------------------------

def torch_linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on the CPU, bit for bit.

    torch fills the first half as start + step*i and the second as end - step*(steps-1-i), in float32, and the
    compiler fuses each multiply-add; numpy's float64 linspace differs by an ulp in a third of the entries, and
    over 1000 cumulative products that moves sigma_max by a few ulp, which a 2-step Heun amplifies past 1e-5.
    """
    if steps == 1:
        return np.array([start], dtype=f32)
    s, e = f32(start), f32(end)
    step = f32(e - s) / f32(steps - 1)
    half = steps // 2
    index = np.arange(steps)
    first = fma_float32(index[:half].astype(f32), step, np.full(half, s))
    second = fma_float32((steps - 1 - index[half:]).astype(f32), -step, np.full(steps - half, e))
    return np.concatenate([first, second]).astype(f32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's squaredcos_cap_v2 schedule, alpha_bar(t) = cos((t+0.008)/1.008 * pi/2)^2."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=f32)


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so the last step has zero SNR (float32)."""
    alphas_bar_sqrt = np.sqrt(_cumprod(f32(1) - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return f32(1) - alphas


def _cumprod(values: np.ndarray) -> np.ndarray:
    """torch.cumprod on a float32 CPU tensor: accumulated in double, each prefix rounded to float32."""
    return np.cumprod(values.astype(np.float64)).astype(f32)


def alphas_cumprod(cfg: Config, *, zero_snr_floor: bool = False) -> np.ndarray:
    """Cumulative products of (1 - beta) for the training timesteps, float32.

    ``zero_snr_floor``: the sigma-based classes set the last entry to 2**-24 under rescale_betas_zero_snr so that
    sigma stays finite; DDIM/DDPM/LCM do not.
    """
    n = int(cfg["num_train_timesteps"])
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=f32)
    elif cfg["beta_schedule"] == "linear":
        betas = torch_linspace32(cfg["beta_start"], cfg["beta_end"], n)
    elif cfg["beta_schedule"] == "scaled_linear":
        root = torch_linspace32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n)
        betas = root * root
    else:
        betas = _cosine_betas(n)
    rescale = bool(cfg.get("rescale_betas_zero_snr", False))
    if rescale:
        betas = _zero_terminal_snr(betas)
    table = _cumprod(f32(1) - betas)
    if rescale and zero_snr_floor:
        table[-1] = f32(2.0**-24)
    return table


def train_sigmas(table: np.ndarray) -> np.ndarray:
    """k-diffusion sigmas of the training timesteps, sqrt((1 - alpha_bar) / alpha_bar), float32, ascending in t."""
    return np.sqrt((f32(1) - table) / table)


# ---- timestep spacing (Lin et al. 2023, Table 2) ---------------------------------------------------------------

def spaced_timesteps(cfg: Config, n: int) -> np.ndarray:
    """DDIM/DDPM-style integer timesteps, descending, one per step (int64)."""
    train, spacing = int(cfg["num_train_timesteps"]), cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, train - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (train // n)).round()[::-1].astype(np.int64) + int(cfg["steps_offset"])
    return np.round(np.arange(train, 0, -train / n)).astype(np.int64) - 1


def spaced_timesteps_float(cfg: Config, n: int) -> np.ndarray:
    """The k-diffusion-style classes' float32 timesteps (Euler, Heun, LMS), descending."""
    train, spacing = int(cfg["num_train_timesteps"]), cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, train - 1, n, dtype=f32)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (train // n)).round()[::-1].astype(f32) + f32(cfg["steps_offset"])
    return np.arange(train, 0, -train / n).round().astype(f32) - f32(1)


def spaced_timesteps_multistep(cfg: Config, n: int, last_timestep: int) -> np.ndarray:
    """DPM-Solver / UniPC integer timesteps: n+1 points, the final (t=0) end dropped."""
    train, spacing = int(cfg["num_train_timesteps"]), cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last_timestep // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + int(cfg["steps_offset"])
    return np.arange(last_timestep, 0, -train / n).round().astype(np.int64) - 1


# ---- sigma schedules -------------------------------------------------------------------------------------------

def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: n sigmas from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def karras_bounds(cfg: Config, in_sigmas: np.ndarray) -> tuple[float, float]:
    """sigma_min / sigma_max: the config's when it names them (diffusers reads them off any config), else the ends."""
    lo, hi = cfg.hidden("sigma_min"), cfg.hidden("sigma_max")
    return (float(in_sigmas[-1]) if lo is None else float(lo)), (float(in_sigmas[0]) if hi is None else float(hi))


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log sigma (k-diffusion ``sigma_to_t``)."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    table = log_train_sigmas.astype(np.float64)
    low = np.clip(np.searchsorted(table, log_sigma, side="right") - 1, 0, len(table) - 2)
    high = low + 1
    w = np.clip((table[low] - log_sigma) / (table[low] - table[high]), 0, 1)
    return (1 - w) * low + w * high


# ---- float32 scalar arithmetic as torch does it on 0-d tensors -------------------------------------------------

def log32(x) -> np.float32:
    """Correctly rounded float32 log (glibc's logf on a 0-d tensor; numpy's SIMD log may be 1 ulp off)."""
    with np.errstate(divide="ignore"):
        return f32(np.log(np.float64(x)))


def exp32(x) -> np.float32:
    with np.errstate(over="ignore"):
        return f32(np.exp(np.float64(x)))


def expm1_32(x) -> np.float32:
    with np.errstate(over="ignore"):
        return f32(np.expm1(np.float64(x)))


def alpha_sigma(sigma) -> tuple[np.float32, np.float32]:
    """(alpha_t, sigma_t) of a k-diffusion sigma: alpha_t = 1/sqrt(sigma^2+1), sigma_t = sigma*alpha_t (float32)."""
    sigma = f32(sigma)
    alpha_t = f32(1) / np.sqrt(sigma * sigma + f32(1))
    return alpha_t, sigma * alpha_t


def lambda32(sigma) -> np.float32:
    """Half log-SNR, log(alpha_t) - log(sigma_t), in float32 (inf at sigma = 0)."""
    alpha_t, sigma_t = alpha_sigma(sigma)
    return f32(log32(alpha_t) - log32(sigma_t))
