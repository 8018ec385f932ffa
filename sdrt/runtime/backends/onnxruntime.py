"""ONNX Runtime backend: the CPU provider by default (the embedded default that works everywhere); CUDA or
TensorRT execution providers where onnxruntime-gpu is installed, with IO binding.

Session options are chosen by measurement on the CPU (see benchmarks/): all graph optimizations, sequential
execution, one intra-op thread per available core, memory arena on, memory patterns off (a pattern is
allocated afresh on the second call at each shape: at 512 px that call page-faulted 0.9 GB in the VAE decoder
and its process peaked 0.9 GB higher, for no steady-state gain; benchmarks/RESULTS.md).

Each session has its own intra-op thread pool, whose threads spin for a while after every call, waiting for the
next. Only the UNets (``unet``, ``unet_deep``, ``unet_shallow``) are called back to back, so only their pools
spin; the text encoders' and VAEs' sleep between calls. Spinning there stole a core from the UNet in the serving
engine, which calls them between UNet steps: their spinning threads took 0.4 s of CPU each in a 3.4 s load run
and the service made 14.4 images/s, against 15.8-16.9 with them sleeping (benchmarks/RESULTS.md, issue 23).
ControlNets, though called every step, sleep too: each runs right before a UNet call, and their spinning made
the service with ControlNets 6.4-6.7 images/s instead of 10.5-10.7 (benchmarks/RESULTS.md, issue 25).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from sdrt.errors import MissingDependencyError, StageError, UserError
from sdrt.runtime.backends.base import Backend, Session, TensorSpec
from sdrt.runtime.onnx_weights import check_overrides, graph_initializers

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def spins(component: str) -> bool:
    """Whether ``component``'s intra-op threads spin between calls: the UNets', called back to back (see above)."""
    return component.split("_")[0] == "unet"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _version(text: str) -> tuple[int, ...]:
    """"1.24.1" -> (1, 24, 1); a local or dev suffix is ignored."""
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def runs_variant(ort_version: str, variant: dict) -> bool:
    """Whether this onnxruntime runs a variant graph: its manifest entry may name the oldest one that does
    (the same numbers come from the portable graph otherwise, only slower)."""
    need = variant.get("min_onnxruntime")
    return need is None or _version(ort_version) >= _version(need)


def _add_overrides(ort, opts, path: Path, initializers: Mapping[str, np.ndarray]) -> list:
    """Hand onnxruntime the replacement initializers; returns the OrtValues, which it uses without a copy.

    One of the same shape as a stored external-data initializer is swapped in as the graph loads
    (``add_external_initializers``), so every graph optimization sees it; the others (stored inside the graph,
    or of another shape, as an embedding table with rows added) replace the graph's in the session
    (``add_initializer``). The latter is not seen by the CPU provider's NCHWc pass, which reorders convolution
    weights from the graph's own values, so conv weights must come the first way (export stores the weights a
    LoRA patches in the external-data file for this).
    """
    stored = graph_initializers(path)
    keep, external = [], {}
    for name, value in initializers.items():
        keep.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)))
        init = stored[name]
        if init.file is not None and init.file != Path(path) and tuple(value.shape) == init.shape:
            external[name] = keep[-1]
        else:
            opts.add_initializer(name, keep[-1])
    if external:
        opts.add_external_initializers(list(external), list(external.values()))
    return keep


class OrtSession(Session):
    def __init__(self, component: str, session, inputs, outputs, use_io_binding: bool, path=None, keep=()):
        self.component = component
        self.path = path  # the graph file this session runs (a "cpu" variant or the portable model.onnx)
        self._session = session
        self._keep = keep  # the OrtValues of initializer overrides: onnxruntime uses them without a copy
        self.inputs = inputs
        self.outputs = outputs
        self._output_names = [o.name for o in outputs]
        self._io_binding = use_io_binding

    def run_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self._run(feeds)
        except Exception as e:  # ORT raises its own types (e.g. an allocation failure for a huge size)
            raise StageError(f"{self.component}: onnxruntime failed ({str(e).splitlines()[0]})") from None

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._io_binding:
            # Inputs copied to the device once per call, outputs allocated by ORT on the device and copied back.
            binding = self._session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            for name in self._output_names:
                binding.bind_output(name, "cuda")
            self._session.run_with_iobinding(binding)
            values = binding.copy_outputs_to_cpu()
        else:
            values = self._session.run(self._output_names, dict(feeds))
        return dict(zip(self._output_names, values))


class OnnxRuntimeBackend(Backend):
    """Run components with onnxruntime. ``device``: "cpu", "cuda" or "tensorrt" (execution providers)."""

    def __init__(self, device: str = "cpu", threads: int | None = None, optimized_cache: bool = False):
        if device not in PROVIDERS:
            raise UserError(f"onnxruntime device {device!r}: choose one of {', '.join(PROVIDERS)}")
        self.device = device
        self.name = "onnxruntime" if device == "cpu" else f"onnxruntime-{device}"
        self.threads = threads or available_cores()
        self.optimized_cache = optimized_cache

    def _ort(self):
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("onnxruntime", "runtime", "the default backend") from None
        if self.device != "cpu":
            have = ort.get_available_providers()
            need = PROVIDERS[self.device][0]
            if need not in have:
                raise UserError(
                    f"backend 'ort-{self.device}' needs {need}, which this onnxruntime lacks (it has "
                    f"{', '.join(have)}); install onnxruntime-gpu, or use --backend cpu")
        return ort

    def session_options(self):
        ort = self._ort()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.enable_cpu_mem_arena = True
        opts.enable_mem_pattern = False  # see the module docstring
        opts.log_severity_level = 3
        return opts

    def load(self, manifest, component: str, initializers: Mapping[str, np.ndarray] | None = None) -> OrtSession:
        ort = self._ort()
        entry = manifest.component(component)
        # The CPU provider runs a component's "cpu" variant where export wrote one (the UNet with fused attention,
        # the VAE with GroupNorm as LayerNormalization) and this onnxruntime can run it; others the portable graph.
        variant = entry.get("variants", {}).get("cpu") if self.device == "cpu" else None
        use_variant = variant is not None and runs_variant(ort.__version__, variant)
        path = manifest.graph_path(component, "cpu" if use_variant else None)
        opts = self.session_options()
        if not spins(component):
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        keep = []
        if initializers:
            check_overrides(component, path, initializers)
            keep = _add_overrides(ort, opts, path, initializers)
        try:
            session = ort.InferenceSession(str(path), opts, providers=PROVIDERS[self.device])
        except Exception as e:  # ORT raises its own exception types for corrupt or truncated graphs
            raise UserError(f"component {component!r}: {path} could not be loaded ({str(e).splitlines()[0]})") from None
        inputs = tuple(TensorSpec.from_dict(d) for d in entry["inputs"])
        outputs = tuple(TensorSpec.from_dict(d) for d in entry["outputs"])
        graph_inputs = [i.name for i in session.get_inputs()]
        if graph_inputs != [s.name for s in inputs]:
            raise UserError(
                f"component {component!r}: graph inputs {graph_inputs} differ from the manifest's "
                f"{[s.name for s in inputs]} (corrupt engine directory)")
        return OrtSession(component, session, inputs, outputs, use_io_binding=self.device != "cpu", path=path,
                          keep=tuple(keep))

    def describe(self) -> str:
        return f"{self.name} ({self.threads} threads)" if self.device == "cpu" else self.name
