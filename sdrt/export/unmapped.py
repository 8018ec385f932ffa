"""Give a loaded model its weights in the process's own memory, read from its safetensors files.

diffusers and transformers load safetensors memory-mapped: each weight is a view of the file's mapping, and the
mapping lives as long as any weight of the file does. The export rewrites weights one at a time (each Linear's
weight stored transposed while tracing: sdrt.export.rewrites.linear_as_matmul), which frees an original only if
it is not such a view; mapped, the full-size SDXL UNet kept its 10 GiB of file pages resident beside the
rewritten ones. Copying each weight from its mapping would fault in the file pages just the same, and a
mapping cannot be released piecewise; so each weight is read with file reads (through the page cache, not
into the process's resident set: sdrt.runtime.safetensors_file) into fresh memory and swapped in, before anything touched the mapping. When
the last weight of a file is swapped, its mapping is unmapped. Memory never holds more than the model plus one
weight, which ``diffusers.from_pretrained(disable_mmap=True)`` does not promise: it reads a whole file into
bytes and then builds tensors from them (twice a 10 GB single-file UNet).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdrt.runtime.safetensors_file import SafetensorsFile


def loaded_files(folder: Path) -> list[Path]:
    """The ``*.safetensors`` files of ``folder`` that from_pretrained reads without a variant: not
    ``model.fp16.safetensors`` nor ``model.fp16-00001-of-00002.safetensors`` (a variant's name has a second
    dot), which hold the same names at another precision."""
    return sorted(p for p in Path(folder).glob("*.safetensors") if p.name.count(".") == 1)


def read_weights_into_memory(model: torch.nn.Module, folder: Path) -> int:
    """Replace every parameter and buffer of ``model`` that one of ``folder``'s safetensors files (those
    :func:`loaded_files` names) holds under the same name and shape by a copy read from the file into the
    process's memory (converted to the model's dtype); returns how many bytes were read. Weights the files do
    not hold as the model does (renamed or reshaped on load, say from a legacy layout) are left as they are,
    and so is a file whose weights are not all replaced (its mapping stays), which costs memory but never
    changes a value. A truncated file is a UserError naming the tensor.
    """
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    read = 0
    for path in loaded_files(folder):
        file = SafetensorsFile(path)  # reads each tensor with file reads (np.fromfile), never a mapping
        for name in file.keys():
            t = tensors.get(name)
            if t is None or tuple(t.shape) != file.shape(name) or t.device.type != "cpu":
                continue
            value = torch.from_numpy(file.read(name))
            with torch.no_grad():
                t.data = value.to(t.dtype)
            begin, end = file.header[name]["data_offsets"]
            read += end - begin
            del value
    return read
