"""The TensorRT backend: runs the plans ``sdrt build`` wrote, with the ONNX Runtime backend's interface.

Importing this module imports neither tensorrt nor CUDA; :meth:`TensorRTBackend.load` does, and turns
their absence into :class:`MissingDependencyError` naming the ``gpu`` extra, and a missing GPU into a
UserError. API used (TensorRT >= 10 Python API): ``Runtime.deserialize_cuda_engine``,
``ICudaEngine.num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_dtype``,
``IExecutionContext.set_optimization_profile_async / set_input_shape / get_tensor_shape /
set_tensor_address / execute_async_v3``, all on one CUDA stream.

Per component the manifest lists engine entries (``manifest.data["engines"][component]``). An entry is
usable when its cache key matches this TensorRT version, this GPU's compute capability and the current
ONNX graph (see :mod:`sdrt.runtime.engine_cache`); per request, the first usable entry with a profile that
contains every input shape runs it (static entries first, then fp16, then the narrowest). Buffers (device
and pinned host) are allocated once per (engine, profile, shapes) and reused; a few shape sets are kept.

Replaced weights (``load(..., initializers=...)``: LoRAs at run time) need plans built refittable (`sdrt build
--refittable`): each usable refittable plan is deserialized at load and refitted in place through
``trt.Refitter`` (``get_all_weights``, ``set_named_weights`` with the ONNX initializer's name,
``get_missing_weights``, filled from the graph's stored values, then ``refit_cuda_engine``). A weight's shape
cannot change in a plan, so a grown token table (textual-inversion embeddings) is refused.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from sdrt.errors import MissingDependencyError, UserError
from sdrt.runtime.backends.base import Backend, Session, TensorSpec
from sdrt.runtime.engine_cache import describe_profile, is_static, profile_fits, stale_reason


logger = logging.getLogger(__name__)


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError("tensorrt", "gpu", "needed by the tensorrt backend and `sdrt build`") from None
    return trt


# ---- choosing an engine: pure, tested on CPU -------------------------------------------------------------

def _rank(entry: Mapping[str, Any]) -> tuple:
    volume = sum(int(np.prod(s["max"], dtype=np.int64)) for p in entry["profiles"] for s in p.values())
    return (not is_static(entry["profiles"]), entry.get("precision") != "fp16", volume)


def usable_entries(manifest, component: str, tensorrt_version: str, compute_capability: str) -> list[dict]:
    """The component's engine entries valid here, best first; a UserError saying why when there are none."""
    entries = manifest.data.get("engines", {}).get(component, [])
    where = str(manifest.engine_dir)
    if not entries:
        raise UserError(f"{component}: no TensorRT engine in {where}; build them with `sdrt build {where}`")
    onnx_sha = manifest.component(component).get("sha256", "")
    good, reasons = [], []
    for e in entries:
        why = stale_reason(e, manifest.engine_dir, onnx_sha, tensorrt_version, compute_capability)
        if why is None:
            good.append(e)
        else:
            reasons.append(f"{e.get('key', '?')}: {why}")
    if not good:
        raise UserError(
            f"{component}: every TensorRT engine in {where} is stale ({'; '.join(reasons)}); "
            f"rerun `sdrt build {where}`")
    return sorted(good, key=_rank)


def refittable_entries(component: str, entries: list[dict], where: str) -> list[dict]:
    """The usable entries built refittable; a UserError saying how to get one when there are none."""
    good = [e for e in entries if e.get("refittable")]
    if not good:
        raise UserError(f"{component}: replacing weights (LoRAs) on TensorRT needs a refittable plan, and those in "
                        f"{where} are not; rebuild with `sdrt build {where} --refittable`")
    return good


def refit_engine(trt, engine, component: str, where: str, initializers: Mapping[str, np.ndarray],
                 stored) -> int:
    """Refit ``engine`` in place with ``initializers`` (ONNX initializer name -> array); ``stored(name)`` reads a
    weight TensorRT asks for alongside (a layer's other weights) from the graph. Returns the weights set."""
    refitter = trt.Refitter(engine, trt.Logger(trt.Logger.ERROR))
    known = set(refitter.get_all_weights())
    unknown = sorted(set(initializers) - known)
    if unknown:
        raise UserError(f"{component}: {where} has no refittable weight {', '.join(map(repr, unknown[:3]))}"
                        f"{f' (and {len(unknown) - 3} more)' if len(unknown) > 3 else ''}; rebuild it with "
                        f"`sdrt build --refittable`")
    keep = []  # TensorRT reads the arrays at refit_cuda_engine: they must live until then

    def put(name: str, value: np.ndarray) -> None:
        keep.append(np.ascontiguousarray(value, dtype=np.float32))
        if not refitter.set_named_weights(name, trt.Weights(keep[-1])):
            raise UserError(f"{component}: TensorRT refused weight {name!r} of shape {list(keep[-1].shape)} for "
                            f"{where} (a plan's weight cannot change shape: textual-inversion embeddings, which add "
                            f"rows to the token table, need --backend cpu, ort-cuda or openvino)")

    for name, value in initializers.items():
        put(name, value)
    for name in list(refitter.get_missing_weights()):
        put(name, stored(name))
    still = list(refitter.get_missing_weights())
    if still:
        raise UserError(f"{component}: TensorRT still lacks weights {still[:3]} to refit {where}")
    if not refitter.refit_cuda_engine():
        raise UserError(f"{component}: TensorRT could not refit {where}")
    return len(keep)


def select_profile(component: str, entries: list[Mapping[str, Any]],
                   shapes: Mapping[str, tuple[int, ...]]) -> tuple[Mapping[str, Any], int]:
    """The first (entry, profile index) whose profile contains every input shape."""
    for e in entries:
        for i, p in enumerate(e["profiles"]):
            if profile_fits(p, shapes):
                return e, i
    got = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
    built = " | ".join(f"engine {e.get('key')} ({e.get('precision')}) profile {i}: {describe_profile(p)}"
                       for e in entries for i, p in enumerate(e["profiles"]))
    raise UserError(
        f"{component}: no TensorRT profile accepts {got}; built profiles: {built}. "
        f"Rebuild with `sdrt build` and --batch/--height/--width ranges that cover this request")


# ---- the backend ----------------------------------------------------------------------------------------

class TensorRTBackend(Backend):
    """Runs components from TensorRT plans on one NVIDIA GPU.

    ``cuda_graph``: capture each static-shape run in a CUDA graph after its first run and replay it.
    ``max_shape_sets``: how many sets of input shapes keep their buffers per component.
    """

    name = "tensorrt"

    def __init__(self, device: int = 0, cuda_graph: bool = False, max_shape_sets: int = 4):
        self.device = device
        self.cuda_graph = cuda_graph
        self.max_shape_sets = max_shape_sets
        self._gpu: tuple[str, str] | None = None

    def load(self, manifest, component: str, initializers: Mapping[str, np.ndarray] | None = None) -> "TensorRTSession":
        trt = import_tensorrt()
        from sdrt.runtime.backends import cuda

        cuda.cudart()
        if self._gpu is None:
            self._gpu = cuda.device_info(self.device)
        _, cc = self._gpu
        entries = usable_entries(manifest, component, trt.__version__, cc)
        if initializers:
            entries = refittable_entries(component, entries, str(manifest.engine_dir))
        spec = manifest.component(component)
        session = TensorRTSession(
            component,
            tuple(TensorSpec.from_dict(d) for d in spec["inputs"]),
            tuple(TensorSpec.from_dict(d) for d in spec["outputs"]),
            entries, manifest.engine_dir, trt,
            cuda_graph=self.cuda_graph, max_shape_sets=self.max_shape_sets)
        if initializers:
            from sdrt.runtime.onnx_weights import check_overrides, graph_initializers

            graph = Path(manifest.engine_dir) / spec["file"]
            check_overrides(component, graph, initializers)
            stored = graph_initializers(graph)
            grown = [n for n, v in initializers.items() if tuple(v.shape) != tuple(stored[n].shape)]
            if grown:
                session.close()
                raise UserError(f"{component}: weight {grown[0]!r} would change shape {list(stored[grown[0]].shape)} -> "
                                f"{list(initializers[grown[0]].shape)}, which a TensorRT plan cannot (textual-inversion "
                                f"embeddings add rows to the token table): use --backend cpu, ort-cuda or openvino")
            try:
                session.refit(initializers, lambda name: stored[name].read())
            except BaseException:
                session.close()
                raise
        return session

    def describe(self) -> str:
        if self._gpu:
            return f"tensorrt ({self._gpu[0]}, sm {self._gpu[1]})"
        return self.name


class _Bindings:
    """Device and pinned host buffers for one (engine, profile, input shapes), and its CUDA graph."""

    def __init__(self, cuda, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, np.dtype]):
        self.host = {n: cuda.PinnedHostArray(shapes[n], dtypes[n]) for n in shapes}
        self.device = {n: cuda.DeviceBuffer(h.nbytes) for n, h in self.host.items()}
        self.graph = None
        self.runs = 0

    def close(self) -> None:
        if self.graph is not None:
            self.graph.close()
        for b in list(self.device.values()) + list(self.host.values()):
            b.close()


class _Engine:
    """A deserialized plan and its one execution context."""

    def __init__(self, trt, runtime, entry: Mapping[str, Any], engine_dir: Path, component: str,
                 inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]):
        plan = Path(engine_dir) / entry["plan"]
        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise UserError(f"{component}: TensorRT could not deserialize {plan}; rerun `sdrt build {engine_dir}`")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        want_in, want_out = {s.name for s in inputs}, {s.name for s in outputs}
        if set(self.inputs) != want_in or not want_out <= set(self.outputs):
            raise UserError(
                f"{component}: plan {plan} has inputs {sorted(self.inputs)} and outputs {sorted(self.outputs)}, "
                f"manifest says {sorted(want_in)} -> {sorted(want_out)}; rerun `sdrt build {engine_dir}`")
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.context = self.engine.create_execution_context()
        self.current: tuple | None = None  # the bindings key the context is set up for
        self.static = is_static(entry["profiles"])
        self.graph_failed = False  # a CUDA graph capture failed once: run plainly from then on


class TensorRTSession(Session):
    """One component on TensorRT. ``run`` is thread-safe: calls share one stream and take turns."""

    def __init__(self, component: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 entries: list[dict], engine_dir: Path, trt, cuda_graph: bool = False, max_shape_sets: int = 4):
        from sdrt.runtime.backends import cuda

        self.component = component
        self.inputs = inputs
        self.outputs = outputs
        self.entries = entries
        self._engine_dir = Path(engine_dir)
        self._trt = trt
        self._cuda = cuda
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        self._stream = cuda.Stream()
        self._engines: dict[str, _Engine] = {}
        self._bindings: OrderedDict[tuple, _Bindings] = OrderedDict()
        self._cuda_graph = cuda_graph
        self._max_shape_sets = max(1, max_shape_sets)
        self._lock = threading.Lock()

    def _engine(self, entry: Mapping[str, Any]) -> _Engine:
        eng = self._engines.get(entry["key"])
        if eng is None:
            eng = _Engine(self._trt, self._runtime, entry, self._engine_dir, self.component, self.inputs, self.outputs)
            self._engines[entry["key"]] = eng
        return eng

    def refit(self, initializers: Mapping[str, np.ndarray], stored) -> None:
        """Deserialize every entry's plan now and refit it with ``initializers`` (see :func:`refit_engine`)."""
        with self._lock:
            for entry in self.entries:
                refit_engine(self._trt, self._engine(entry).engine, self.component, entry["plan"], initializers,
                             stored)

    def _prepare(self, eng: _Engine, key: tuple, profile: int, shapes: Mapping[str, tuple[int, ...]]) -> _Bindings:
        """Point the context at this shape set's buffers, allocating them on first use."""
        ctx = eng.context
        b = self._bindings.get(key)
        if b is not None and eng.current == key:
            self._bindings.move_to_end(key)
            return b
        if ctx.active_optimization_profile != profile:
            if not ctx.set_optimization_profile_async(profile, self._stream.handle):
                raise RuntimeError(f"{self.component}: TensorRT refused optimization profile {profile}")
        for name, shape in shapes.items():
            if not ctx.set_input_shape(name, tuple(shape)):
                raise UserError(f"{self.component}: TensorRT refused shape {list(shape)} for input {name!r}")
        all_shapes = dict(shapes)
        for name in eng.outputs:
            out = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in out):
                raise RuntimeError(f"{self.component}: output {name!r} shape {out} unresolved after setting inputs")
            all_shapes[name] = out
        if b is None:
            while len(self._bindings) >= self._max_shape_sets:
                old_key, old = self._bindings.popitem(last=False)
                old.close()
                if self._engines.get(old_key[0]) is not None and self._engines[old_key[0]].current == old_key:
                    self._engines[old_key[0]].current = None
            b = _Bindings(self._cuda, all_shapes, eng.dtypes)
            self._bindings[key] = b
        for name, dev in b.device.items():
            if not ctx.set_tensor_address(name, dev.ptr):
                raise RuntimeError(f"{self.component}: TensorRT refused the address of tensor {name!r}")
        # A graph captured under another context setup may bake stale state; recapture after a switch.
        # Every run count restarts too: TensorRT wants one plain enqueue after a shape change before capture.
        for other_key, other in self._bindings.items():
            if other_key[0] == key[0]:
                if other.graph is not None:
                    other.graph.close()
                    other.graph = None
                other.runs = 0
        eng.current = key
        self._bindings.move_to_end(key)
        return b

    def _execute(self, eng: _Engine, b: _Bindings) -> None:
        stream = self._stream
        if b.graph is not None:
            b.graph.launch(stream)
        elif self._cuda_graph and not eng.graph_failed and eng.static and b.runs >= 1:
            # TensorRT's guidance: run enqueue once before capturing, so deferred initialisation is done.
            try:
                b.graph = self._cuda.CudaGraph(stream, lambda: self._enqueue(eng))
            except self._cuda.CudaError as e:
                # Some plans cannot be captured (e.g. layers that synchronise): run this engine plainly from now
                # on rather than paying a failed capture on every call.
                eng.graph_failed = True
                logger.warning("%s: CUDA graph capture failed (%s); running without CUDA graphs", self.component, e)
                self._enqueue(eng)
            else:
                b.graph.launch(stream)
        else:
            self._enqueue(eng)
        b.runs += 1

    def _enqueue(self, eng: _Engine) -> None:
        if not eng.context.execute_async_v3(self._stream.handle):
            raise RuntimeError(f"{self.component}: TensorRT execute_async_v3 failed")

    def dim_limit(self, name: str, axis: int) -> int | None:
        """The largest size any usable plan's profiles allow."""
        return max(p[name]["max"][axis] for e in self.entries for p in e["profiles"])

    def run_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = {n: tuple(int(d) for d in a.shape) for n, a in feeds.items()}
        entry, profile = select_profile(self.component, self.entries, shapes)
        cuda = self._cuda
        with self._lock:
            eng = self._engine(entry)
            key = (entry["key"], profile, tuple(sorted(shapes.items())))
            b = self._prepare(eng, key, profile, shapes)
            try:
                for name in eng.inputs:
                    np.copyto(b.host[name].array, feeds[name], casting="same_kind")
                    cuda.copy_to_device(b.device[name], b.host[name], self._stream)
                self._execute(eng, b)
                for spec in self.outputs:
                    cuda.copy_to_host(b.host[spec.name], b.device[spec.name], self._stream)
            except BaseException:
                # Copies already queued still read and write these pinned buffers: let them finish before the
                # lock lets another call refill them (or close frees them).
                self._drain()
                raise
            self._stream.synchronize()
            return {s.name: b.host[s.name].array.astype(s.dtype, copy=True) for s in self.outputs}

    def _drain(self) -> None:
        """Wait for the stream after a failure; its own error, if any, must not hide the first one."""
        try:
            self._stream.synchronize()
        except Exception as e:  # noqa: BLE001 - the original error is being raised
            logger.warning("%s: synchronising the stream after an error failed too: %s", self.component, e)

    def close(self) -> None:
        with self._lock:
            for b in self._bindings.values():
                b.close()
            self._bindings.clear()
            self._engines.clear()
            if self._stream is not None:
                self._stream.close()
                self._stream = None
