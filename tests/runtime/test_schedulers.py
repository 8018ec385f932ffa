"""sdrt.runtime.schedulers against diffusers, trajectory by trajectory.

Each case runs the same deterministic dummy denoiser through diffusers (``Class.from_config(config)``, driven the
way StableDiffusionPipeline / StableDiffusionImg2ImgPipeline drive it, noise from ``torch.Generator("cpu")``)
and through sdrt (``make_scheduler`` + ``TorchCPUGenerator``), and compares the latents after every step.
"Matches to 1e-5 relative" means: at every step, max |sdrt - diffusers| <= 1e-5 * max(|diffusers|, 1e-3-floor),
i.e. relative to the tensor's scale (element-wise relative error is meaningless for values crossing zero).
"""

from __future__ import annotations

import inspect
import math
import threading

import numpy as np
import pytest

from sdrt.bench.reference import SCHEDULER_CLASSES
from tools.make_models import SD1_SCHEDULER

from sdrt.errors import UserError
from sdrt.runtime.rng import TorchCPUGenerator
from sdrt.runtime.schedulers import SCHEDULER_NAMES, make_scheduler, scheduler_name_for_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SHAPE = (1, 4, 8, 8)
SEED = 1234
RTOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

# Stable Diffusion 1.5's scheduler_config.json (as released checkpoints ship it).
SD15 = SD1_SCHEDULER

# name -> (diffusers class name, from_config overrides): the reference table, not the implementation's.
DIFFUSERS = SCHEDULER_CLASSES


def _needs_scipy(name: str) -> None:
    if name == "lms":
        pytest.importorskip("scipy", reason="diffusers' LMSDiscreteScheduler needs scipy")


def dummy_denoiser(x: np.ndarray, t: float) -> np.ndarray:
    """Deterministic, mildly nonlinear, timestep-dependent stand-in for a UNet (numpy, so both sides agree)."""
    return (np.tanh(x) * np.float32(0.8) + np.float32(0.05 * math.cos(float(t) / 97.0)) * x).astype(np.float32)


def init_latent() -> np.ndarray:
    return (np.linspace(-1.5, 1.5, int(np.prod(SHAPE)), dtype=np.float32) ** 3).reshape(SHAPE)


def run_diffusers(name, config, steps, strength=None, seed=SEED, begin_at_zero=False):
    class_name, overrides = DIFFUSERS[name]
    sched = getattr(diffusers, class_name).from_config(dict(config), **overrides)
    gen = torch.Generator("cpu").manual_seed(seed)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if begin_at_zero:
        sched.set_begin_index(0)
    if strength is None:
        x = torch.randn(SHAPE, generator=gen, dtype=torch.float32) * sched.init_noise_sigma
    else:
        t_start = steps - min(int(steps * strength), steps)
        timesteps = timesteps[t_start * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        noise = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
        x = sched.add_noise(torch.from_numpy(init_latent()), noise, timesteps[:1])
    kwargs = {"generator": gen} if "generator" in inspect.signature(sched.step).parameters else {}
    if "eta" in inspect.signature(sched.step).parameters:
        kwargs["eta"] = 0.0
    out = [x.numpy().copy()]
    for t in timesteps:
        x_in = sched.scale_model_input(x, t)
        eps = torch.from_numpy(dummy_denoiser(x_in.numpy(), float(t)))
        x = sched.step(eps, t, x, **kwargs).prev_sample
        out.append(x.numpy().copy())
    return sched, out


def run_sdrt(name, config, steps, strength=None, seed=SEED):
    sched = make_scheduler(name, config, steps)
    rng = TorchCPUGenerator(seed)
    if strength is None:
        begin = 0
        x = rng.randn(SHAPE) * sched.init_noise_sigma
    else:
        begin = sched.begin_index(strength)
        x = sched.add_noise(init_latent(), rng.randn(SHAPE), begin)
    state = sched.init_state(begin)
    out = [x.copy()]
    for i in range(begin, len(sched.timesteps)):
        x_in = sched.scale_model_input(x, i)
        eps = dummy_denoiser(x_in, float(np.float32(sched.timesteps[i])))
        x = sched.step(state, i, eps, x, rng)
        assert x.dtype == np.float32
        out.append(x.copy())
    return sched, out


def assert_trajectories_match(ours, theirs, rtol=RTOL):
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert np.isfinite(b).all()
        assert np.isfinite(a).all(), f"non-finite at step {step}"
        scale = max(float(np.abs(b).max()), 1e-3)
        err = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
        assert err <= rtol * scale, f"step {step}: max abs diff {err:.3g} vs scale {scale:.3g}"


def reference_run(name, config, steps, strength=None):
    """diffusers' trajectory, or None when diffusers refuses the combination (raises, or returns NaN)."""
    try:
        sched, out = run_diffusers(name, config, steps, strength)
    except (ValueError, NotImplementedError, AssertionError):  # diffusers asserts in UniPC.step
        return None
    except IndexError:
        # diffusers' txt2img loop finds its start by looking up timesteps[0] and takes the second match when it
        # repeats (karras sigmas rounded to integer timesteps), then runs off the end of its sigma table. sdrt
        # starts at index 0, which is what diffusers does once set_begin_index(0) is called (its img2img path).
        if strength is not None or not hasattr(getattr(diffusers, DIFFUSERS[name][0]), "set_begin_index"):
            return None
        try:
            sched, out = run_diffusers(name, config, steps, strength, begin_at_zero=True)
        except (IndexError, ValueError):
            return None
        if (sched.timesteps == sched.timesteps[0]).sum() < 2:
            return None
    if not all(np.isfinite(x).all() for x in out):
        return None  # e.g. DPM-Solver/UniPC with repeated timesteps: h = 0, diffusers divides by it
    return sched, out


def check_against_diffusers(name, config, steps, strength=None, rtol=RTOL):
    _needs_scipy(name)
    reference = reference_run(name, config, steps, strength)
    if reference is None:
        # diffusers refuses this combination; sdrt must refuse it too, with a UserError.
        with pytest.raises(UserError):
            run_sdrt(name, config, steps, strength)
        return
    theirs_sched, theirs = reference
    ours_sched, ours = run_sdrt(name, config, steps, strength)
    # Integer timesteps are equal; fractional (karras) ones to 2e-7: torch's float32 sqrt is not correctly rounded
    # (off by an ulp for ~17% of inputs), so its training-sigma table, hence sigma-to-t, differs in the last bit.
    np.testing.assert_allclose(ours_sched.timesteps.astype(np.float32),
                               theirs_sched.timesteps.numpy().astype(np.float32), rtol=2e-7, atol=0)
    assert ours_sched.timesteps.dtype.kind == ("f" if theirs_sched.timesteps.dtype.is_floating_point else "i")
    assert ours_sched.order == theirs_sched.order
    assert ours_sched.init_noise_sigma == pytest.approx(float(theirs_sched.init_noise_sigma), rel=1e-6)
    assert_trajectories_match(ours, theirs, rtol)


# ---- the grid --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2, 7, 25, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_trajectory_matches_diffusers(name, prediction, spacing, steps):
    config = {**SD15, "prediction_type": prediction, "timestep_spacing": spacing}
    check_against_diffusers(name, config, steps)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", [n for n in SCHEDULER_NAMES if n not in ("lcm", "lms")])
def test_trajectory_1000_steps(name, spacing):
    """1000 steps: the full training schedule (DDPM's native use) and the longest history a multistep holds.
    (leading + steps_offset 1 is invalid at 1000 steps for the integer-timestep schedulers: refused, see below.)"""
    check_against_diffusers(name, {**SD15, "timestep_spacing": spacing}, 1000)


def test_trajectory_1000_steps_lms():
    """LMS once only: diffusers integrates its coefficients with scipy's quad at every step (seconds per run)."""
    check_against_diffusers("lms", {**SD15, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 1000)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "pndm", "lcm"])
def test_1000_steps_invalid_combinations_are_refused(name):
    """leading spacing + steps_offset 1 puts the first of 1000 steps at t=1000 (past the table): diffusers fails
    with an IndexError mid-loop, sdrt refuses up front; LCM refuses more than original_inference_steps."""
    check_against_diffusers(name, SD15, 1000)
    with pytest.raises(UserError):
        make_scheduler(name, SD15, 1000)


# ---- img2img -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strength", [0.3, 0.8, 1.0])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_img2img_matches_diffusers(name, strength):
    check_against_diffusers(name, SD15, 10, strength=strength)


@pytest.mark.parametrize("name", ["pndm", "heun", "dpmpp_2m", "unipc", "lms"])
def test_img2img_odd_strength_and_steps(name):
    """Strengths whose int(n*strength) rounds (7 steps * 0.55), multistep warm-up restarting part-way."""
    check_against_diffusers(name, {**SD15, "timestep_spacing": "trailing"}, 7, strength=0.55)


def test_begin_index_formula():
    for name in SCHEDULER_NAMES:
        sched = make_scheduler(name, SD15, 20)
        for strength in (0.3, 0.8, 1.0, 0.05):
            t_start = 20 - min(int(20 * strength), 20)
            assert sched.begin_index(strength) == t_start * sched.order
    with pytest.raises(UserError, match="strength"):
        make_scheduler("euler", SD15, 20).begin_index(0.0)
    with pytest.raises(UserError, match="strength"):
        make_scheduler("euler", SD15, 20).begin_index(1.5)
    with pytest.raises(UserError, match="no step"):
        make_scheduler("euler", SD15, 2).begin_index(0.3)


# ---- configs -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_unknown_keys_are_ignored(name):
    config = {**SD15, "some_future_option": [1, 2], "another_unknown": "x", "_class_name": "FancyScheduler"}
    check_against_diffusers(name, config, 7)
    a = run_sdrt(name, config, 7)[1][-1]
    b = run_sdrt(name, SD15, 7)[1][-1]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_missing_keys_take_each_class_default(name):
    """A bare config: every key defaulted the way each diffusers class defaults it (DDIM clips, Heun/LCM
    have their own beta ranges, LMS/Euler use linspace spacing...)."""
    check_against_diffusers(name, {}, 7)


@pytest.mark.parametrize("config", [SD15, {}, {**SD15, "rescale_betas_zero_snr": True},
                                    {**SD15, "beta_schedule": "squaredcos_cap_v2"},
                                    {**SD15, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}])
def test_training_tables_equal_diffusers_bit_for_bit(config):
    """Bit for bit, except under rescale_betas_zero_snr, which takes square roots: torch's float32 sqrt is not
    correctly rounded, so there the tables agree to a few ulp (1e-5 relative near the zero-SNR end)."""
    for name in ("ddim", "lcm", "euler"):
        class_name, overrides = DIFFUSERS[name]
        theirs = getattr(diffusers, class_name).from_config(config, **overrides).alphas_cumprod.numpy()
        ours = make_scheduler(name, config, 10).alphas_cumprod
        if config.get("rescale_betas_zero_snr"):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=0)
        else:
            np.testing.assert_array_equal(ours, theirs)


def test_missing_keys_differ_per_class():
    """The defaults really are per class: LCM's default betas are not DDIM's."""
    assert not np.allclose(make_scheduler("lcm", {}, 4).alphas_cumprod, make_scheduler("ddim", {}, 4).alphas_cumprod)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler_a", "dpmpp_2m", "unipc", "lcm"])
def test_rescale_betas_zero_snr(name):
    config = {**SD15, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
              "prediction_type": "v_prediction"}
    check_against_diffusers(name, config, 25)


def test_rescale_betas_zero_snr_euler():
    """Euler under zero terminal SNR starts at sigma_max = sqrt((1 - 2**-24) / 2**-24) = 4096 - 1.2e-4, a
    near-tie: IEEE sqrt rounds it to 4095.99976, torch's CPU sqrt (errors up to ~0.75 ulp, not correctly
    rounded) to 4096; torch's sigma table differs from the IEEE one by an ulp in other places too. One ulp of
    x_T at |x| ~ 1e4 is ~1e-3 absolute, which the 4096 -> 52 first step keeps while shrinking the latents 80x, so
    the last steps sit at ~1.0e-5 relative: this case is held to 2e-5, and init_noise_sigma to one ulp."""
    config = {**SD15, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
              "prediction_type": "v_prediction"}
    check_against_diffusers("euler", config, 25, rtol=2e-5)
    ours = np.float32(make_scheduler("euler", config, 25).init_noise_sigma)
    theirs = np.float32(diffusers.EulerDiscreteScheduler.from_config(config).init_noise_sigma)
    assert abs(int(ours.view(np.int32)) - int(theirs.view(np.int32))) <= 1


@pytest.mark.parametrize("name", ["ddim", "ddpm", "heun", "lcm"])
def test_clip_sample(name):
    config = {**SD15, "clip_sample": True, "clip_sample_range": 0.5, "prediction_type": "sample"}
    check_against_diffusers(name, config, 7)
    # and the clipping changes the result (the test would catch it being ignored)
    unclipped = run_sdrt(name, {**config, "clip_sample": False}, 7)[1][-1]
    assert not np.allclose(run_sdrt(name, config, 7)[1][-1], unclipped)


@pytest.mark.parametrize("name", ["ddim", "pndm", "lcm"])
def test_set_alpha_to_one(name):
    check_against_diffusers(name, {**SD15, "set_alpha_to_one": True}, 7)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "heun"])
def test_squaredcos_and_linear_betas(name):
    check_against_diffusers(name, {**SD15, "beta_schedule": "squaredcos_cap_v2"}, 7)
    check_against_diffusers(name, {**SD15, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, 7)


@pytest.mark.parametrize("steps", [4, 25])
def test_pndm_with_prk_warmup(steps):
    check_against_diffusers("pndm", {**SD15, "skip_prk_steps": False}, steps)
    check_against_diffusers("pndm", {**SD15, "skip_prk_steps": False}, steps, strength=0.8)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "dpmpp_2m_karras", "unipc"])
def test_final_sigma_min(name):
    check_against_diffusers(name, {**SD15, "final_sigmas_type": "sigma_min"}, 7)
    check_against_diffusers(name, {**SD15, "final_sigmas_type": "sigma_min"}, 20)


@pytest.mark.parametrize("name", ["euler", "heun", "lms", "unipc"])
def test_karras_sigmas_from_config(name):
    check_against_diffusers(name, {**SD15, "use_karras_sigmas": True}, 7)


def test_dpmpp_heun_solver_type_and_lower_order_final():
    check_against_diffusers("dpmpp_2m", {**SD15, "solver_type": "heun"}, 7)
    check_against_diffusers("dpmpp_2m", {**SD15, "lambda_min_clipped": -5.1}, 7)
    check_against_diffusers("dpmpp_2m", {**SD15, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, 20)


@pytest.mark.parametrize("options", [{"solver_order": 3}, {"solver_order": 1}, {"disable_corrector": [0, 2]},
                                     # at a zero final sigma diffusers computes 0 * inf = nan for these two
                                     {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
                                     {"predict_x0": False, "final_sigmas_type": "sigma_min"}])
def test_unipc_options(options):
    check_against_diffusers("unipc", {**SD15, **options}, 7)


def test_unipc_noise_prediction_to_zero_sigma_is_refused():
    """diffusers returns NaN here (0 * inf in the last update); sdrt says why instead."""
    config = {**SD15, "predict_x0": False}
    assert reference_run("unipc", config, 7) is None
    with pytest.raises(UserError, match="predict_x0"):
        make_scheduler("unipc", config, 7)


def test_ddpm_fixed_large_variance():
    check_against_diffusers("ddpm", {**SD15, "variance_type": "fixed_large"}, 7)


def test_use_default_values_are_defaulted():
    """Keys a saved config lists in _use_default_values are re-defaulted, as from_config does."""
    config = {**SD15, "clip_sample": False, "_use_default_values": ["clip_sample"]}
    check_against_diffusers("ddim", {**config, "prediction_type": "sample"}, 7)


@pytest.mark.parametrize("config, match", [
    ({"thresholding": True}, "thresholding"),
    ({"beta_schedule": "sigmoid"}, "beta_schedule"),
    ({"timestep_spacing": "cosine"}, "timestep_spacing"),
    ({"prediction_type": "flow_prediction"}, "prediction_type"),
])
def test_unsupported_options_are_refused(config, match):
    with pytest.raises(UserError, match=match):
        make_scheduler("ddim", {**SD15, **config}, 10)


def test_unsupported_option_values_per_class():
    with pytest.raises(UserError, match="variance_type"):
        make_scheduler("ddpm", {**SD15, "variance_type": "learned_range"}, 10)
    with pytest.raises(UserError, match="use_exponential_sigmas"):
        make_scheduler("euler", {**SD15, "use_exponential_sigmas": True}, 10)
    with pytest.raises(UserError, match="lcm"):
        make_scheduler("lcm", SD15, 51)


# ---- interface ---------------------------------------------------------------------------------------------

def test_names_and_errors():
    assert SCHEDULER_NAMES == ("ddim", "pndm", "ddpm", "lms", "euler", "euler_a", "heun", "dpmpp_2m",
                               "dpmpp_2m_karras", "unipc", "lcm")
    with pytest.raises(UserError) as err:
        make_scheduler("dpm++", SD15, 10)
    assert str(err.value) == ("unknown scheduler 'dpm++'; choose one of: ddim, pndm, ddpm, lms, euler, euler_a, heun, "
                              "dpmpp_2m, dpmpp_2m_karras, unipc, lcm")
    for bad in (0, -3):
        with pytest.raises(UserError, match=str(bad)):
            make_scheduler("euler", SD15, bad)


def test_name_for_config():
    assert scheduler_name_for_config(SD15) == "pndm"
    assert scheduler_name_for_config({"_class_name": "EulerDiscreteScheduler"}) == "euler"
    assert scheduler_name_for_config({"_class_name": "DPMSolverMultistepScheduler"}) == "dpmpp_2m"
    assert scheduler_name_for_config({"_class_name": "DPMSolverMultistepScheduler",
                                      "use_karras_sigmas": True}) == "dpmpp_2m_karras"
    with pytest.raises(UserError, match="algorithm_type"):
        scheduler_name_for_config({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"})
    with pytest.raises(UserError, match="KDPM2"):
        scheduler_name_for_config({"_class_name": "KDPM2DiscreteScheduler"})
    with pytest.raises(UserError):
        scheduler_name_for_config({})


def test_none_name_is_the_models_own_scheduler():
    config = {**SD15, "_class_name": "EulerAncestralDiscreteScheduler"}
    _, ours = run_sdrt(None, config, 7)
    _, named = run_sdrt("euler_a", config, 7)
    np.testing.assert_array_equal(ours[-1], named[-1])
    check_against_diffusers("euler_a", config, 7)


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m", "unipc", "pndm", "euler_a"])
def test_one_instance_serves_interleaved_calls(name):
    """The instance is immutable: two calls stepping alternately (as two threads would) get the sequential result."""
    sched = make_scheduler(name, SD15, 9)
    results = {}

    def call(seed):
        rng = TorchCPUGenerator(seed)
        x = rng.randn(SHAPE) * sched.init_noise_sigma
        state = sched.init_state(0)
        for i in range(len(sched.timesteps)):
            x = sched.step(state, i, dummy_denoiser(sched.scale_model_input(x, i), sched.timesteps[i]), x, rng)
            yield
        results[seed] = x

    a, b = call(1), call(2)
    for _ in zip(a, b):
        pass
    for _ in a:
        pass
    for _ in b:
        pass
    threads = [threading.Thread(target=lambda s=s: [None for _ in call(s)]) for s in (1, 2)]
    interleaved = dict(results)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed in (1, 2):
        np.testing.assert_array_equal(interleaved[seed], results[seed])
    assert not np.array_equal(results[1], results[2])


def test_stochastic_scheduler_needs_rng():
    sched = make_scheduler("euler_a", SD15, 4)
    x = np.zeros(SHAPE, dtype=np.float32)
    with pytest.raises(ValueError, match="rng"):
        sched.step(sched.init_state(), 0, x, x, None)


# ---- real model configs, as shipped ------------------------------------------------------------------------

SD21_V = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
          "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
          "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
          "trained_betas": None}
SDXL = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
        "use_karras_sigmas": False}
LCM_DREAMSHAPER = {"_class_name": "LCMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                   "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0,
                   "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000, "original_inference_steps": 50,
                   "prediction_type": "epsilon", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
                   "set_alpha_to_one": True, "steps_offset": 1, "thresholding": False, "timestep_scaling": 10.0,
                   "timestep_spacing": "leading", "trained_betas": None}


@pytest.mark.parametrize("config, own", [(SD15, "pndm"), (SD21_V, "ddim"), (SDXL, "euler"), (LCM_DREAMSHAPER, "lcm")])
@pytest.mark.parametrize("name", (None,) + SCHEDULER_NAMES)
def test_shipped_configs(config, own, name):
    assert scheduler_name_for_config(config) == own
    steps = 4 if (name or own) == "lcm" else 20
    check_against_diffusers(name or own, config, steps)


@pytest.mark.parametrize("name", ["dpmpp_2m_karras", "heun", "euler", "unipc"])
def test_karras_bounds_read_from_any_config(name):
    """diffusers' karras conversion reads sigma_min/sigma_max off the config even where the class does not take
    them (DPM-Solver, Heun), so an Euler-style config's bounds apply to every karras scheduler."""
    config = {**SD15, "sigma_min": 0.1, "sigma_max": 10.0,
              "use_karras_sigmas": name != "dpmpp_2m_karras" or None}
    config = {k: v for k, v in config.items() if v is not None}
    check_against_diffusers(name, config, 7)
    assert make_scheduler(name, config, 7).sigmas[0] == pytest.approx(10.0, rel=1e-6)


@pytest.mark.parametrize("name", ["ddim", "euler_a", "dpmpp_2m"])
def test_trained_betas(name):
    betas = list(np.linspace(0.0002, 0.015, 1000))
    check_against_diffusers(name, {**SD15, "trained_betas": betas}, 7)
