"""Backends: one small interface (sdrt.runtime.backends.base), several ways to run it.

Heavy dependencies (tensorrt, CUDA bindings) are imported only when their backend loads a component.
"""

from __future__ import annotations

import inspect

from sdrt.errors import UserError
from sdrt.runtime.backends.base import Backend, Session, TensorSpec

# name -> description, for --backend
BACKENDS = {
    "cpu": "ONNX Runtime, CPU provider (default; works everywhere)",
    "ort-cuda": "ONNX Runtime, CUDA provider (needs onnxruntime-gpu)",
    "ort-tensorrt": "ONNX Runtime, TensorRT provider (needs onnxruntime-gpu and TensorRT)",
    "openvino": "OpenVINO on the same ONNX files, CPU, f32 (bf16 with --precision bf16 where the CPU has it; needs the openvino extra)",
    "tensorrt": "native TensorRT plans from `sdrt build` through CUDA buffers (needs the gpu extra)",
}
DEFAULT_BACKEND = "cpu"
THREADED_BACKENDS = ("cpu", "ort-cuda", "ort-tensorrt", "openvino")  # those that take threads= (CPU threads)


def get_backend(name: str | Backend = DEFAULT_BACKEND, **options) -> Backend:
    """A backend by name (see BACKENDS), or the given Backend instance itself; ``options`` go to its constructor
    (e.g. ``threads``: every backend but tensorrt takes it)."""
    if isinstance(name, Backend):
        return name
    cls, args = _backend_class(name)
    parameters = list(inspect.signature(cls).parameters)[len(args):]
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise UserError(f"backend option {unknown[0]!r}: backend {name!r} takes {', '.join(parameters) or 'none'}")
    return cls(*args, **options)


def _backend_class(name) -> tuple[type[Backend], tuple]:
    """The class that implements backend ``name`` and the leading arguments that select it."""
    if name in ("cpu", "onnxruntime", "ort-cuda", "ort-tensorrt"):
        from sdrt.runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend, (name.split("-", 1)[1] if name.startswith("ort-") else "cpu",)
    if name == "openvino":
        from sdrt.runtime.backends.openvino import OpenVinoBackend

        return OpenVinoBackend, ()
    if name == "tensorrt":
        try:
            from sdrt.runtime.backends.tensorrt import TensorRTBackend
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("sdrt"):
                raise UserError("backend 'tensorrt' is not part of this sdrt build") from None
            raise
        return TensorRTBackend, ()
    raise UserError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")


__all__ = ["Backend", "Session", "TensorSpec", "BACKENDS", "DEFAULT_BACKEND", "THREADED_BACKENDS", "get_backend"]
