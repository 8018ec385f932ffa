"""fp16 safety: compare an engine with the fp32 ONNX graph on random inputs, and say whether to keep it.

An engine that produces NaN or inf is refused outright; one whose relative L2 error against ONNX Runtime
fp32 exceeds the component's limit is refused too. The limits are gross-error gates (fp16 SD engines sit
near 1e-3); the measured numbers go into the manifest, where a reader can judge them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

REL_L2_LIMIT = {"text_encoder": 0.05, "text_encoder_2": 0.05, "unet": 0.05, "vae_decoder": 0.05, "vae_encoder": 0.05}
TIME_ID_RANGE = (0, 1024)  # SDXL's time ids: sizes and crops in pixels (and an aesthetic score below that)
TIMESTEP_RANGE = (0.0, 1000.0)
DEFAULT_TOKEN_RANGE = 256  # the byte-level tokens every CLIP vocabulary has, unless the manifest says more


@dataclass(frozen=True)
class Verdict:
    ok: bool
    rel_l2: float
    max_abs: float
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"rel_l2": self.rel_l2, "max_abs": self.max_abs}


def random_feeds(inputs: list[Mapping[str, Any]], shapes: Mapping[str, list[int]], model: Mapping[str, Any],
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Plausible random inputs: token ids within the vocabulary, timesteps in the training range, SDXL's time
    ids as pixel sizes, N(0, 1) else."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        name, shape, dtype = spec["name"], tuple(shapes[spec["name"]]), np.dtype(spec["dtype"])
        if np.issubdtype(dtype, np.integer):
            feeds[name] = rng.integers(0, int(model.get("vocab_size", DEFAULT_TOKEN_RANGE)), size=shape).astype(dtype)
        elif name == "timestep":
            feeds[name] = rng.uniform(*TIMESTEP_RANGE, size=shape).astype(dtype)
        elif name == "time_ids":
            feeds[name] = rng.integers(*TIME_ID_RANGE, size=shape).astype(dtype)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def compare(component: str, got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray],
            limit: float | None = None) -> Verdict:
    """Worst rel_l2 / max_abs over the outputs both have; NaN or inf in ``got`` refuses the engine."""
    limit = REL_L2_LIMIT.get(component, 0.05) if limit is None else limit
    worst_rel, worst_abs = 0.0, 0.0
    for name, ref in want.items():
        out = np.asarray(got[name], dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if out.shape != ref.shape:
            return Verdict(False, float("inf"), float("inf"), f"output {name!r} shape {out.shape} != {ref.shape}")
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out)).sum())
            return Verdict(False, float("nan"), float("nan"), f"output {name!r} has {bad} NaN/inf values")
        diff = out - ref
        rel = float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-12))
        worst_rel = max(worst_rel, rel)
        worst_abs = max(worst_abs, float(np.abs(diff).max(initial=0.0)))
    if worst_rel > limit:
        return Verdict(False, worst_rel, worst_abs, f"rel_l2 {worst_rel:.3g} exceeds {limit}")
    return Verdict(True, worst_rel, worst_abs)


def check_engine(component: str, inputs: list[Mapping[str, Any]], profiles: list[Mapping[str, Any]],
                 model: Mapping[str, Any], run_engine: Callable, run_reference: Callable,
                 limit: float | None = None) -> Verdict:
    """Run engine and reference on random inputs at each profile's OPT shapes; the worst verdict wins."""
    verdicts = []
    for i, profile in enumerate(profiles):
        feeds = random_feeds(inputs, {n: s["opt"] for n, s in profile.items()}, model, seed=i)
        v = compare(component, run_engine(feeds), run_reference(feeds), limit)
        if not v.ok:
            return v
        verdicts.append(v)
    return max(verdicts, key=lambda v: v.rel_l2)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB between two images of the same shape (inf when identical)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)
