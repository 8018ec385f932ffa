"""Stand-ins for ``tensorrt`` and ``cuda.bindings.runtime`` so the backend's logic runs on CPU.

"Device" memory is host memory from ctypes; a fake plan is JSON naming, per output, the input it scales.
They model the documented behaviour the backend relies on (set_input_shape refuses shapes outside the
active profile; outputs resolve after every input shape is set); they prove the bookkeeping, not TensorRT.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types

import numpy as np


class _Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorNoDevice = 100


def make_cudart(devices: int = 1):
    mem: dict[int, ctypes.Array] = {}
    log = {"malloc": 0, "free": 0, "h2d": 0, "d2h": 0, "graph_launch": 0}

    def alloc(n):
        buf = ctypes.create_string_buffer(n)
        mem[ctypes.addressof(buf)] = buf
        return _Err.cudaSuccess, ctypes.addressof(buf)

    def free(p):
        mem.pop(p)
        log["free"] += 1
        return (_Err.cudaSuccess,)

    def malloc(n):
        log["malloc"] += 1
        return alloc(n)

    def memcpy(dst, src, n, kind, stream):
        ctypes.memmove(dst, src, n)
        log["h2d" if kind == "h2d" else "d2h"] += 1
        return (_Err.cudaSuccess,)

    props = types.SimpleNamespace(name=b"Fake GPU", major=8, minor=9)
    rt = types.SimpleNamespace(
        cudaError_t=_Err,
        cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice="h2d", cudaMemcpyDeviceToHost="d2h"),
        cudaStreamCaptureMode=types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1),
        cudaGetErrorString=lambda e: (_Err.cudaSuccess, b"no CUDA-capable device is detected"),
        cudaGetDeviceCount=lambda: (_Err.cudaSuccess, devices) if devices else (_Err.cudaErrorNoDevice, 0),
        cudaSetDevice=lambda d: (_Err.cudaSuccess,),
        cudaGetDeviceProperties=lambda d: (_Err.cudaSuccess, props),
        cudaStreamCreate=lambda: (_Err.cudaSuccess, 7),
        cudaStreamDestroy=lambda s: (_Err.cudaSuccess,),
        cudaStreamSynchronize=lambda s: (_Err.cudaSuccess,),
        cudaMalloc=malloc, cudaFree=free, cudaMallocHost=alloc,
        cudaFreeHost=lambda p: (mem.pop(p), (_Err.cudaSuccess,))[1],
        cudaMemcpyAsync=memcpy,
        cudaStreamBeginCapture=lambda s, m: (_Err.cudaSuccess,),
        cudaStreamEndCapture=lambda s: (_Err.cudaSuccess, "graph"),
        cudaGraphInstantiate=lambda g, f: (_Err.cudaSuccess, "exec"),
        cudaGraphLaunch=lambda e, s: (log.__setitem__("graph_launch", log["graph_launch"] + 1), (_Err.cudaSuccess,))[1],
        cudaGraphExecDestroy=lambda e: (_Err.cudaSuccess,),
        cudaGraphDestroy=lambda g: (_Err.cudaSuccess,),
    )
    rt.log = log
    rt.mem = mem
    return rt


def fake_plan(inputs: dict[str, str], outputs: dict[str, tuple[str, float | str]], profiles: list,
              weights: dict[str, list] | None = None, refittable: bool = False,
              layers: list[list[str]] = ()) -> bytes:
    """``outputs``: name -> (input it equals, times scale: a number, or the name of a weight whose first value
    is the scale). ``weights``: the plan's weights (name -> values); ``refittable``: a Refitter may replace them;
    ``layers``: groups of weights that must be set together (a refit of one asks for the others)."""
    return json.dumps({"inputs": inputs, "outputs": outputs, "profiles": profiles, "weights": weights or {},
                       "refittable": refittable, "layers": [list(g) for g in layers]}).encode()


class _Context:
    def __init__(self, plan, log):
        self.plan, self.log = plan, log
        self.active_optimization_profile = 0
        self.shapes, self.addresses = {}, {}

    def set_optimization_profile_async(self, index, stream):
        self.active_optimization_profile = index
        self.shapes = {}
        self.log.append(("profile", index))
        return True

    def set_input_shape(self, name, shape):
        p = self.plan["profiles"][self.active_optimization_profile][name]
        if not all(lo <= d <= hi for d, lo, hi in zip(shape, p["min"], p["max"])):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        if name in self.plan["inputs"]:
            return self.shapes.get(name, (-1,))
        src = self.plan["outputs"][name][0]
        return self.shapes.get(src, (-1,))

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def _array(self, name, shape):
        n = int(np.prod(shape)) * 4
        return np.frombuffer((ctypes.c_byte * n).from_address(self.addresses[name]), np.float32).reshape(shape)

    def execute_async_v3(self, stream):
        self.log.append(("execute",))
        for out, (src, scale) in self.plan["outputs"].items():
            if isinstance(scale, str):
                scale = float(self.plan["weights"][scale][0])
            shape = self.shapes[src]
            self._array(out, shape)[...] = self._array(src, shape) * scale
        return True


class _Engine:
    def __init__(self, plan, log):
        self.plan, self.log = plan, log
        self.names = list(plan["inputs"]) + list(plan["outputs"])

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "INPUT" if name in self.plan["inputs"] else "OUTPUT"

    def get_tensor_dtype(self, name):
        return "float32"

    def create_execution_context(self):
        return _Context(self.plan, self.log)


def make_tensorrt(version: str = "10.3.0"):
    log: list = []

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            try:
                return _Engine(json.loads(data), log)
            except ValueError:
                return None

    class Weights:
        def __init__(self, array):
            self.array = np.array(array, np.float32)  # TensorRT copies at refit; a copy here models that

    class Refitter:
        """Refits a deserialized fake engine: only a refittable plan's weights are known; a weight's size cannot
        change; setting one weight of a layer makes the others missing until they are set too."""

        def __init__(self, engine, logger):
            self.engine, self.pending = engine, {}
            log.append(("refitter",))

        def get_all_weights(self):
            return list(self.engine.plan["weights"]) if self.engine.plan["refittable"] else []

        def set_named_weights(self, name, weights):
            old = self.engine.plan["weights"].get(name)
            if old is None or np.size(old) != weights.array.size:
                return False
            self.pending[name] = weights.array.ravel().tolist()
            log.append(("set", name))
            return True

        def get_missing_weights(self):
            return [w for g in self.engine.plan["layers"] if any(n in self.pending for n in g)
                    for w in g if w not in self.pending]

        def refit_cuda_engine(self):
            if self.get_missing_weights():
                return False
            self.engine.plan["weights"].update(self.pending)
            log.append(("refit", sorted(self.pending)))
            return True

    trt = types.SimpleNamespace(
        __version__=version, Runtime=Runtime, Refitter=Refitter, Weights=Weights, TensorIOMode=types.SimpleNamespace(INPUT="INPUT"),
        Logger=types.SimpleNamespace(ERROR=0), nptype=lambda t: np.dtype(t).type)
    trt.Logger = type("Logger", (), {"ERROR": 0, "__init__": lambda self, level=0: None})
    trt.log = log
    return trt
