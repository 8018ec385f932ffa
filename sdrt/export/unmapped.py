"""Give a loaded model its weights in the process's own memory, read from its safetensors files.

diffusers and transformers load safetensors memory-mapped: each weight is a view of the file's mapping, and the
mapping lives as long as any weight of the file does. The export rewrites weights one at a time (each Linear's
weight stored transposed while tracing: sdrt.export.rewrites.linear_as_matmul), which frees an original only if
it is not such a view; mapped, the full-size SDXL UNet kept its 10 GiB of file pages resident beside the
rewritten ones. Copying each weight from its mapping would fault in the file pages just the same, and a
mapping cannot be released piecewise; so each weight is read with ``readinto`` (through the page cache, not
into the process's resident set) into fresh memory and swapped in, before anything touched the mapping. When
the last weight of a file is swapped, its mapping is unmapped. Memory never holds more than the model plus one
weight, which ``diffusers.from_pretrained(disable_mmap=True)`` does not promise: it reads a whole file into
bytes and then builds tensors from them (twice a 10 GB single-file UNet).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def safetensors_index(path: Path) -> tuple[int, dict[str, dict]]:
    """(where the data begins, {name: {"dtype", "shape", "data_offsets"}}) from a safetensors file's header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def read_weights_into_memory(model: torch.nn.Module, folder: Path) -> int:
    """Replace every parameter and buffer of ``model`` that one of ``folder``'s ``*.safetensors`` files holds
    under the same name, shape and (after conversion to the model's dtype) values, by a copy read from the file
    into the process's memory; returns how many bytes were read. Weights the files do not hold as the model does
    (renamed or reshaped on load, say from a legacy layout) are left as they are, and so is a file whose weights
    are not all replaced (its mapping stays), which costs memory but never changes a value.
    """
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    read = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        start, index = safetensors_index(path)
        with open(path, "rb", buffering=0) as f:
            for name, entry in index.items():
                t = tensors.get(name)
                dtype = _DTYPES.get(entry["dtype"])
                if t is None or dtype is None or list(t.shape) != entry["shape"] or t.device.type != "cpu":
                    continue
                begin, end = entry["data_offsets"]
                raw = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(start + begin)
                view = memoryview(raw.numpy()).cast("B")
                got = 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        raise OSError(f"{path}: {name} is cut short")
                    got += n
                value = raw.view(dtype).reshape(entry["shape"]) if end > begin else torch.empty(entry["shape"], dtype=dtype)
                if dtype != t.dtype:
                    value = value.to(t.dtype)
                with torch.no_grad():
                    t.data = value
                read += end - begin
                del raw, value
    return read
