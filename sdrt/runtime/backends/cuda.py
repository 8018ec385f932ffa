"""A small CUDA layer for the TensorRT backend: device buffers, pinned host buffers, a stream, graphs.

Through NVIDIA's cuda-python runtime bindings (``cuda.bindings.runtime``, cuda-python >= 12.6; the older
``from cuda import cudart`` as fallback), imported lazily: importing this module imports no CUDA. Every
binding call returns ``(cudaError_t, *results)``; :func:`check` turns a failure into an exception.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import numpy as np

from sdrt.errors import MissingDependencyError, UserError

_cudart = None
_lock = threading.Lock()


def cudart():
    """The cuda-python runtime module, imported on first use."""
    global _cudart
    if _cudart is None:
        with _lock:
            try:
                from cuda.bindings import runtime as rt  # cuda-python >= 12.6
            except ImportError:
                try:
                    from cuda import cudart as rt  # older cuda-python
                except ImportError:
                    raise MissingDependencyError(
                        "cuda-python", "gpu", "the TensorRT backend moves data with it") from None
            _cudart = rt
    return _cudart


class CudaError(RuntimeError):
    pass


def check(result) -> Any:
    """Unpack ``(err, *values)`` from a binding call; raise on error."""
    rt = cudart()
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if err != rt.cudaError_t.cudaSuccess:
        _, msg = rt.cudaGetErrorString(err)
        raise CudaError(f"CUDA error {int(err)}: {msg.decode() if isinstance(msg, bytes) else msg}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def device_info(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor"); a UserError when no GPU is usable."""
    rt = cudart()
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess or count == 0:
        why = rt.cudaGetErrorString(err)[1] if err != rt.cudaError_t.cudaSuccess else b"no devices"
        why = why.decode() if isinstance(why, bytes) else str(why)
        raise UserError(f"no CUDA GPU is usable here ({why}); the tensorrt backend needs an NVIDIA GPU "
                        f"(use --backend onnxruntime on this machine)")
    if device >= count:
        raise UserError(f"CUDA device {device} does not exist; this machine has {count}")
    check(rt.cudaSetDevice(device))
    props = check(rt.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return name, f"{props.major}.{props.minor}"


class Stream:
    """One CUDA stream; ``handle`` is the integer TensorRT's execute_async_v3 takes."""

    def __init__(self):
        rt = cudart()
        self._stream = check(rt.cudaStreamCreate())
        try:
            self.handle = int(self._stream)
        except TypeError:
            self.handle = int(self._stream.getPtr())

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self._stream))

    @property
    def raw(self):
        return self._stream

    def close(self) -> None:
        if self._stream is not None:
            check(cudart().cudaStreamDestroy(self._stream))
            self._stream = None


class DeviceBuffer:
    """``nbytes`` of device memory, freed on close."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.ptr = int(check(cudart().cudaMalloc(max(self.nbytes, 1))))

    def close(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr))
            self.ptr = 0


class PinnedHostArray:
    """A page-locked host array (``.array`` is a numpy view over it): async copies need pinned memory."""

    def __init__(self, shape: tuple[int, ...], dtype):
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(d) for d in shape)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr = int(check(cudart().cudaMallocHost(max(self.nbytes, 1))))
        raw = (ctypes.c_byte * max(self.nbytes, 1)).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=np.uint8, count=self.nbytes).view(self.dtype).reshape(self.shape)

    def close(self) -> None:
        if self.ptr:
            self.array = None
            check(cudart().cudaFreeHost(self.ptr))
            self.ptr = 0


def copy_to_device(dst: DeviceBuffer, src: PinnedHostArray, stream: Stream) -> None:
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst.ptr, src.ptr, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.raw))


def copy_to_host(dst: PinnedHostArray, src: DeviceBuffer, stream: Stream) -> None:
    rt = cudart()
    check(rt.cudaMemcpyAsync(dst.ptr, src.ptr, dst.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.raw))


class CudaGraph:
    """A captured sequence of work on a stream, replayed with one launch (static shapes, fixed addresses)."""

    def __init__(self, stream: Stream, enqueue):
        rt = cudart()
        self._graph = self._exec = None
        # Thread-local capture mode: other threads' sessions may allocate while this one captures.
        check(rt.cudaStreamBeginCapture(stream.raw, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        try:
            enqueue()
        except BaseException:
            # end the capture whatever happened, so the stream is usable again, and free what it made
            result = rt.cudaStreamEndCapture(stream.raw)
            if isinstance(result, tuple) and len(result) > 1 and result[1] is not None:
                rt.cudaGraphDestroy(result[1])
            raise
        graph = check(rt.cudaStreamEndCapture(stream.raw))
        try:
            self._exec = check(rt.cudaGraphInstantiate(graph, 0))
        except BaseException:
            rt.cudaGraphDestroy(graph)
            raise
        self._graph = graph

    def launch(self, stream: Stream) -> None:
        check(cudart().cudaGraphLaunch(self._exec, stream.raw))

    def close(self) -> None:
        rt = cudart()
        if self._exec is not None:
            check(rt.cudaGraphExecDestroy(self._exec))
            check(rt.cudaGraphDestroy(self._graph))
            self._exec = self._graph = None


def roundtrip(array: np.ndarray) -> np.ndarray:
    """Copy ``array`` host -> device -> host through pinned buffers on a stream (gpu_check uses this)."""
    stream = Stream()
    src = PinnedHostArray(array.shape, array.dtype)
    dst = PinnedHostArray(array.shape, array.dtype)
    dev = DeviceBuffer(src.nbytes)
    try:
        np.copyto(src.array, array)
        copy_to_device(dev, src, stream)
        copy_to_host(dst, dev, stream)
        stream.synchronize()
        return dst.array.copy()
    finally:
        for b in (dev, src, dst, stream):
            b.close()
