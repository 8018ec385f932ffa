"""The interface every backend implements (ONNX Runtime, TensorRT).

In the spirit of Polygraphy's runners: a :class:`Backend` loads a component into a :class:`Session`; the
session checks every input against the component's metadata before :meth:`Session.run_impl`, so a wrong
name, dtype or shape is an error that names expected and received, whatever backend runs. The pipeline and
the schedulers never know which backend runs.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from sdrt.errors import UserError


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, numpy dtype name and shape (ints, or symbol strings for dynamic dims)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_dict(cls, d: Mapping) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


class Session(abc.ABC):
    """One loaded component. ``run`` may be called from many threads at once."""

    component: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.component, self.inputs, feeds)
        return self.run_impl(feeds)

    @abc.abstractmethod
    def run_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on checked inputs; return every output by name as host numpy arrays."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (device buffers, sessions)."""

    def dim_limit(self, name: str, axis: int) -> int | None:
        """The largest size input ``name`` takes on ``axis``: its fixed size, or None when dynamic and unbounded
        (a backend with bounded shapes, such as TensorRT's profiles, says its bound)."""
        spec = next(s for s in self.inputs if s.name == name)
        dim = spec.shape[axis]
        return dim if isinstance(dim, int) and dim >= 0 else None


class Backend(abc.ABC):
    """A way to run components of an engine directory."""

    name: str

    @abc.abstractmethod
    def load(self, manifest, component: str, initializers: Mapping[str, np.ndarray] | None = None) -> Session:
        """Load ``component`` of the engine directory described by ``manifest`` (a runtime Manifest).

        ``initializers``: ONNX initializer name -> the value to use instead of the graph's (textual-inversion
        rows, patched weights), applied when the session is made; the files are not changed. A backend that
        cannot replace weights raises a UserError when given any.
        """

    def describe(self) -> str:
        return self.name


def check_feeds(component: str, specs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray]) -> None:
    """Every input present, of the right dtype and rank, with static dims equal and symbols consistent."""
    expected = {s.name for s in specs}
    got = set(feeds)
    if expected != got:
        raise UserError(
            f"{component}: inputs {sorted(got)} given, expected {sorted(expected)}")
    symbols: dict[str, int] = {}
    for s in specs:
        a = feeds[s.name]
        if not isinstance(a, np.ndarray):
            raise UserError(f"{component}: input {s.name!r} is {type(a).__name__}, expected numpy.ndarray")
        if a.dtype != np.dtype(s.dtype):
            raise UserError(f"{component}: input {s.name!r} has dtype {a.dtype}, expected {s.dtype}")
        if a.ndim != len(s.shape):
            raise UserError(
                f"{component}: input {s.name!r} has shape {a.shape}, expected rank {len(s.shape)} {list(s.shape)}")
        for dim, want in zip(a.shape, s.shape):
            if isinstance(want, int) and want >= 0:
                if dim != want:
                    raise UserError(f"{component}: input {s.name!r} has shape {a.shape}, expected {list(s.shape)}")
            elif isinstance(want, str):
                if symbols.setdefault(want, dim) != dim:
                    raise UserError(
                        f"{component}: input {s.name!r} has shape {a.shape}; dimension {want!r} is "
                        f"{symbols[want]} elsewhere")
