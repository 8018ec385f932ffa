"""Reading ``.safetensors`` files with numpy alone (the runtime has no torch and no ``safetensors`` package).

The format: an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape, data_offsets
relative to the data that follows; and an optional ``__metadata__`` of strings), then the raw little-endian
bytes. Tensors are read one at a time on request, so a large file is never held whole.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from sdrt.errors import UserError

DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U8": "u1", "BOOL": "?"}
MAX_HEADER_BYTES = 100 * 2**20


class SafetensorsFile:
    """The header of one file; :meth:`read` gives a tensor as a numpy array (BF16 widened to float32)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
                (n,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
                if n is None or not 2 <= n <= MAX_HEADER_BYTES:
                    raise ValueError("no safetensors header")
                header = json.loads(f.read(n))
            self.size = self.path.stat().st_size
        except FileNotFoundError:
            raise UserError(f"{self.path} does not exist") from None
        except (OSError, ValueError) as e:
            raise UserError(f"{self.path}: not a readable .safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise UserError(f"{self.path}: not a readable .safetensors file (its header is not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.header: dict[str, dict] = header
        self._data_start = 8 + n

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def read(self, key: str) -> np.ndarray:
        info = self.header[key]
        dtype = info.get("dtype")
        if dtype not in DTYPES:
            raise UserError(f"{self.path}: tensor {key!r} has dtype {dtype!r}; readable: {', '.join(DTYPES)}")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        np_dtype = np.dtype(DTYPES[dtype])
        count = int(np.prod(shape, dtype=np.int64))
        if end - start != count * np_dtype.itemsize or self._data_start + end > self.size:
            raise UserError(f"{self.path}: tensor {key!r} is truncated or its offsets are wrong")
        a = np.fromfile(self.path, dtype=np_dtype, count=count, offset=self._data_start + start).reshape(shape)
        if dtype == "BF16":  # bfloat16 is the top half of a float32
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np_dtype.newbyteorder("="), copy=False)
