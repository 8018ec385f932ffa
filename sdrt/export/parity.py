"""The parity gate: every exported graph, run in ONNX Runtime, must equal PyTorch on fresh inputs.

Inputs are random and of shapes other than the traced ones, so a shape baked in by the tracer shows up here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdrt.errors import UserError

FP32_REL_L2_LIMIT = 1e-4


class ParityError(UserError):
    pass


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    denom = np.linalg.norm(e)
    return float(np.linalg.norm(a - e) / denom) if denom > 0 else float(np.linalg.norm(a - e))


def check_parity(component: str, graph_path: Path, module: torch.nn.Module, inputs: dict[str, torch.Tensor],
                 output_names: list[str], limit: float = FP32_REL_L2_LIMIT) -> dict:
    """Run torch and ONNX Runtime on ``inputs``; return the worst rel_l2/max_abs; raise above ``limit``."""
    return compare(component, graph_path, torch_outputs(module, inputs), inputs, output_names, limit)


def torch_outputs(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """PyTorch's outputs for ``inputs``: computed before the module is freed, so that ONNX Runtime's session
    never has to share memory with the PyTorch weights (a 2.6B-parameter UNet is 10 GB in fp32)."""
    with torch.no_grad():
        expected = module(*inputs.values())
    if isinstance(expected, torch.Tensor):
        expected = (expected,)
    return [e.numpy() for e in expected]


def compare(component: str, graph_path: Path, expected: list[np.ndarray], inputs: dict[str, torch.Tensor],
            output_names: list[str], limit: float = FP32_REL_L2_LIMIT) -> dict:
    """Run the graph in ONNX Runtime on ``inputs`` and compare with ``expected`` (PyTorch's outputs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(graph_path), opts, providers=["CPUExecutionProvider"])
    actual = session.run(output_names, {k: v.numpy() for k, v in inputs.items()})
    del session
    worst = {"rel_l2": 0.0, "max_abs": 0.0}
    for name, a, e in zip(output_names, actual, expected):
        if a.shape != e.shape:
            raise ParityError(f"{component}: output {name!r} has shape {a.shape} in ONNX Runtime, {e.shape} in PyTorch")
        if not np.isfinite(a).all():
            raise ParityError(f"{component}: output {name!r} has NaN or inf in ONNX Runtime")
        worst["rel_l2"] = max(worst["rel_l2"], rel_l2(a, e))
        worst["max_abs"] = max(worst["max_abs"], float(np.max(np.abs(a.astype(np.float64) - e))))
    worst["inputs"] = {k: list(v.shape) for k, v in inputs.items()}
    if worst["rel_l2"] > limit:
        raise ParityError(
            f"{component}: ONNX Runtime differs from PyTorch by relative L2 {worst['rel_l2']:.3g} "
            f"(limit {limit:g}) on inputs {worst['inputs']}")
    return worst
