"""OpenVINO backend (CPU) on the same ONNX files: an optional alternative to ONNX Runtime's CPU provider.

Inference precision is pinned to f32 by default: on CPUs with bf16 or AMX units OpenVINO would otherwise pick
a lower precision by itself and parity with PyTorch would be lost silently. ``precision="bf16"`` asks for bf16
(sdrt.runtime.precision: only where the CPU has bf16 arithmetic) for the components in BF16_COMPONENTS.
"""

from __future__ import annotations

import os
import queue
from pathlib import Path
from typing import Mapping

import numpy as np

from sdrt.errors import MissingDependencyError, UserError
from sdrt.runtime.backends.base import Backend, Session, TensorSpec
from sdrt.runtime.backends.onnxruntime import available_cores
from sdrt.runtime.onnx_weights import check_overrides
from sdrt.runtime.precision import BF16_COMPONENTS, check_precision


CACHE_DIR_ENV = "SDRT_OPENVINO_CACHE_DIR"


class OpenVinoSession(Session):
    def __init__(self, component, compiled, inputs, outputs):
        self.component = component
        self._compiled = compiled
        self.inputs = inputs
        self.outputs = outputs
        # Infer requests are not thread-safe: keep a pool, one request per concurrent caller.
        self._requests: queue.SimpleQueue = queue.SimpleQueue()

    def run_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            request = self._compiled.create_infer_request()
        try:
            result = request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
            out = {}
            for spec in self.outputs:
                out[spec.name] = np.array(result[self._compiled.output(spec.name)], copy=True)
            return out
        finally:
            self._requests.put(request)


class OpenVinoBackend(Backend):
    name = "openvino"

    def __init__(self, threads: int | None = None, device: str = "CPU", precision: str = "fp32",
                 cache_dir: str | os.PathLike | None = None):
        """``cache_dir`` (default: $SDRT_OPENVINO_CACHE_DIR, else none): OpenVINO keeps the compiled models
        there, so a later start loads them instead of compiling again (bf16 compilation takes long)."""
        self.threads = threads or available_cores()
        self.device = device
        self.precision = check_precision(precision, self.name)
        self.cache_dir = cache_dir if cache_dir is not None else os.environ.get(CACHE_DIR_ENV) or None

    def compile_config(self, component: str | None = None) -> dict:
        """OpenVINO's compile properties (the benchmarks use them too): latency; f32, or bf16 for the
        components bf16 applies to when the backend runs bf16."""
        hint = "bf16" if self.precision == "bf16" and component in BF16_COMPONENTS else "f32"
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self.threads}
        return {**config, "CACHE_DIR": str(self.cache_dir)} if self.cache_dir else config

    def load(self, manifest, component: str, initializers: Mapping[str, np.ndarray] | None = None) -> OpenVinoSession:
        try:
            import openvino as ov
        except ImportError:
            raise MissingDependencyError("openvino", "openvino", "the openvino backend") from None
        entry = manifest.component(component)
        path = Path(manifest.engine_dir) / entry["file"]
        core = ov.Core()
        if self.precision == "bf16" and "BF16" not in core.get_property(self.device, "OPTIMIZATION_CAPABILITIES"):
            raise UserError(f"precision 'bf16': OpenVINO's {self.device} device lists no BF16 capability on this machine")
        try:
            model = core.read_model(str(path))
            if initializers:
                check_overrides(component, path, initializers)
                _replace_constants(model, initializers)
            compiled = core.compile_model(model, self.device, self.compile_config(component))
        except RuntimeError as e:
            raise UserError(f"component {component!r}: OpenVINO could not load {path} ({str(e).splitlines()[0]})") from None
        inputs = tuple(TensorSpec.from_dict(d) for d in entry["inputs"])
        outputs = tuple(TensorSpec.from_dict(d) for d in entry["outputs"])
        return OpenVinoSession(component, compiled, inputs, outputs)

    def describe(self) -> str:
        what = "bf16 (VAE f32)" if self.precision == "bf16" else "f32"
        return f"openvino {self.device} {what} ({self.threads} threads)"


def _replace_constants(model, values: Mapping[str, np.ndarray]) -> None:
    """Point every user of the Constant an ONNX initializer became (same name) at a new Constant of ``values``."""
    from openvino import opset13

    constants = {}
    for op in model.get_ops():
        if op.get_type_name() == "Constant":
            for name in {op.get_friendly_name(), *op.output(0).get_names()}:
                constants[name] = op
    for name, value in values.items():
        if name not in constants:
            raise UserError(f"OpenVINO's reading of the graph has no constant {name!r} to replace (it was folded away)")
        new = opset13.constant(np.ascontiguousarray(value))
        new.set_friendly_name(name)
        for target in list(constants[name].output(0).get_target_inputs()):
            target.replace_source_output(new.output(0))
    model.validate_nodes_and_infer_types()
