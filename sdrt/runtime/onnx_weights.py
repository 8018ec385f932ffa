"""A graph's initializers (name, dtype, shape, where their bytes lie) read from the ONNX file itself, without
the ``onnx`` package: the runtime checks weight overrides against them and reads the token-embedding table.

An ONNX file is a protobuf ``ModelProto``; its ``graph`` (field 7) lists ``initializer`` TensorProtos (field 5)
with ``dims`` (1), ``data_type`` (2), ``name`` (8), ``raw_data`` (9), ``external_data`` (13: location, offset,
length) and ``data_location`` (14). The walk reads only those fields and skips every payload, so a 500 MB
graph is indexed without being parsed.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.errors import UserError

# TensorProto.DataType -> numpy dtype name (the types weights come in)
ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "float64", 16: "bfloat16"}


@dataclass(frozen=True)
class Initializer:
    """One initializer of a graph, and where its little-endian bytes are (None: not stored as raw bytes)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path | None = None
    offset: int = 0
    nbytes: int = 0

    def read(self) -> np.ndarray:
        """The initializer's value (a copy)."""
        if self.file is None or self.dtype == "bfloat16":
            raise UserError(f"initializer {self.name!r} is not stored as raw {self.dtype} bytes; sdrt cannot read it")
        count = int(np.prod(self.shape, dtype=np.int64))
        if self.nbytes != count * np.dtype(self.dtype).itemsize or self.file.stat().st_size < self.offset + self.nbytes:
            raise UserError(f"{self.file}: initializer {self.name!r} is truncated (corrupt engine directory)")
        return np.fromfile(self.file, dtype=np.dtype(self.dtype).newbyteorder("<"), count=count,
                           offset=self.offset).astype(self.dtype, copy=False).reshape(self.shape)


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or (payload start, payload end)) of one message's fields."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = (pos, pos + 8), pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = (pos, pos + n), pos + n
        elif wire == 5:
            value, pos = (pos, pos + 4), pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _tensor(buf, start: int, end: int, graph_file: Path) -> Initializer:
    dims: list[int] = []
    dtype, name, raw, external, location = 0, "", None, {}, 0
    for field, wire, value in _fields(buf, start, end):
        if field == 1 and wire == 0:
            dims.append(value)
        elif field == 1 and wire == 2:  # packed dims
            p, stop = value
            while p < stop:
                d, p = _varint(buf, p)
                dims.append(d)
        elif field == 2:
            dtype = value
        elif field == 8:
            name = bytes(buf[value[0]:value[1]]).decode()
        elif field == 9:
            raw = value
        elif field == 13:
            entry = {k: bytes(buf[v[0]:v[1]]).decode() for k, _, v in _fields(buf, *value) if k in (1, 2)}
            external[entry.get(1, "")] = entry.get(2, "")
        elif field == 14:
            location = value
    file, offset, nbytes = None, 0, 0
    if location == 1 and "location" in external:  # TensorProto.EXTERNAL
        file = graph_file.parent / external["location"]
        offset, nbytes = int(external.get("offset", 0)), int(external.get("length", 0))
    elif raw is not None:
        file, offset, nbytes = graph_file, raw[0], raw[1] - raw[0]
    return Initializer(name, ONNX_DTYPES.get(dtype, f"onnx type {dtype}"), tuple(dims), file, offset, nbytes)


def graph_initializers(path: str | Path) -> dict[str, Initializer]:
    """Every initializer of the ONNX graph at ``path`` (its main graph; not those of subgraphs), by name."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            found = {}
            for field, wire, value in _fields(buf, 0, len(buf)):
                if field == 7 and wire == 2:  # ModelProto.graph
                    for gfield, gwire, gvalue in _fields(buf, *value):
                        if gfield == 5 and gwire == 2:  # GraphProto.initializer
                            init = _tensor(buf, *gvalue, path)
                            found[init.name] = init
            return found
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable ONNX graph ({e})") from None


def check_overrides(component: str, path: str | Path, overrides) -> None:
    """Every override names an initializer of the graph at ``path`` and has its dtype and rank (a table may
    grow, e.g. by textual-inversion rows); backends accept unknown names silently, so this is checked here."""
    known = graph_initializers(path)
    for name, value in overrides.items():
        init = known.get(name)
        if init is None:
            raise UserError(f"{component}: the graph {path} has no initializer {name!r} to replace")
        if not isinstance(value, np.ndarray) or str(value.dtype) != init.dtype or value.ndim != len(init.shape):
            raise UserError(
                f"{component}: initializer {name!r} is {init.dtype} {list(init.shape)}; its replacement is "
                f"{getattr(value, 'dtype', type(value).__name__)} {list(getattr(value, 'shape', []))}")
