"""The steps `sdrt export` and `sdrt export --controlnet` share: loading a component's weights, the trace and
check shapes, a graph's CPU variants, its manifest entry and log line, LoRA fusing, and the clean-up of what a
killed export left. sdrt.export.exporter (the whole export) and sdrt.export.controlnet (ControlNets, --add) both
import from here, never from each other."""

from __future__ import annotations

import gc
import glob
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from sdrt.errors import MissingDependencyError, UserError
from sdrt.runtime.lora import lora_deltas
from sdrt.runtime.manifest import sha256_files

VARIANT_FILE = "model.ort.onnx"  # a component's graph for ONNX Runtime's CPU provider, over the same weights
LAYERNORM_BROADCAST_ORT = "1.24"   # the first onnxruntime whose LayerNormalization broadcasts scale and bias
TRACE_LATENT_MAX = 64  # the largest latent side traced and checked (512 px at SD's factor 8); see _shapes


def _require_torch():
    try:
        import diffusers  # noqa: F401
        import onnx  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(e.name or "torch", "export", "needed by `sdrt export`") from None


def _load_source(ckpt, source: str, allow_pickle: bool):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdrt.export.unmapped import read_weights_into_memory

    cls = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection,
           "unet": UNet2DConditionModel, "vae": AutoencoderKL}[source]
    kwargs = {"use_safetensors": None if allow_pickle else True, "torch_dtype": torch.float32}
    try:
        model = cls.from_pretrained(ckpt.path / source, **kwargs).eval()
    except (OSError, ValueError) as e:  # e.g. only a variant file (model.fp16.safetensors) is present
        raise UserError(f"{ckpt.path / source}: could not load the weights ({str(e).splitlines()[0]})") from None
    # in the process's memory rather than mapped from the files, so that rewriting a weight frees the original
    read_weights_into_memory(model, ckpt.path / source)
    return model


def _release_memory() -> None:
    """Collect garbage and give freed heap memory back to the system. Weights below glibc's mmap threshold
    (which rises to 32 MiB as big blocks are freed) live on the heap, where free() keeps them: without the
    trim, the process held the full-size SDXL UNet's 10 GiB through the VAE's export after freeing it."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to ask
        pass


def _shapes(numbers: dict, latent_size_multiple: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """(batch, latent_h, latent_w, prompt chunks) to trace at, and other sizes to check parity at.

    The UNet is traced at a latent size that is not a multiple of its downsampling factor: diffusers then
    upsamples each decoder level to its skip connection's size (``upsample_size``) instead of by a fixed 2x,
    and the traced graph takes every latent size, as diffusers does. Parity is checked at a size whose height
    is a multiple and whose width is not, so both paths are compared with PyTorch; and with the text of two
    prompt chunks where the trace saw one, so the UNet's sequence axis is checked too.

    Both are taken near min(sample_size, TRACE_LATENT_MAX): the graph does not depend on the size traced, and
    at SDXL's 128x128 latent the trace and the checks would hold activations four times as large and take
    about four times as long, for nothing the smaller sizes do not check.
    """
    s = min(numbers["sample_size"], TRACE_LATENT_MAX)
    m = latent_size_multiple
    odd = 1 if m > 1 else 0
    trace = (2, s + odd, s + odd, 1)
    lo = s - m if s - m >= m else s + m
    check = (1 if s >= 32 else 3, lo, s + 3 * odd, 2)
    return trace, check


def _checked_variants(comp: str, variants: dict, data_file: str | None, expected, check_inputs, outputs) -> dict:
    """The variants an export helper returned ({name: (path, what)}), each compared with PyTorch's outputs."""
    from sdrt.export.parity import compare

    return {name: _variant_entry(comp, path, data_file, compare(f"{comp} ({what.pop('described')})", path, expected,
                                                                check_inputs, outputs), **what)
            for name, (path, what) in variants.items()}


def _entry(comp: str, spec, graph: Path, data_file: str | None, parity: dict, variants: dict, t0: float,
           log: Callable[[str], None] | None, **extra) -> dict:
    """A component's manifest entry (files, sha256, IO, parity, variants), logged (unless ``log`` is None)."""
    files = [graph] + ([graph.parent / data_file] if data_file else [])
    digest, size = sha256_files(files)
    entry = {
        "file": f"{comp}/{graph.name}", "data_file": data_file, "sha256": digest, "size_bytes": size,
        "inputs": [{"name": n, "dtype": d, "shape": list(s)} for n, d, s in spec.inputs],
        "outputs": [{"name": n, "dtype": d, "shape": list(s)} for n, d, s in spec.outputs],
        "parity": parity, "export_s": round(time.perf_counter() - t0, 2), **extra,
    }
    if variants:
        entry["variants"] = variants
    if log is not None:
        log_entry(comp, entry, log)
    return entry


def log_entry(comp: str, entry: dict, log: Callable[[str], None]) -> None:
    """A component's export as one line per graph: parity, size, time; each variant's parity and file."""
    parity = entry["parity"]
    log(f"{comp:12s} rel_l2 {parity['rel_l2']:.2e}  max_abs {parity['max_abs']:.2e}  "
        f"{entry['size_bytes'] / 1e6:9.1f} MB  {entry['export_s']:.1f} s")
    for name, v in entry.get("variants", {}).items():
        log(f"{'':12s} rel_l2 {v['parity']['rel_l2']:.2e}  max_abs {v['parity']['max_abs']:.2e}  "
            f"({name} variant: {v['file']})")


def fuse_loras(model, component: str, loras) -> int:
    """Add the LoRAs' deltas of ``component`` to ``model``'s weights in place; returns how many weights changed.
    The deltas are sdrt.runtime.lora's, the very numbers the runtime adds to an exported graph."""
    import torch

    from sdrt.export.weight_map import patchable_weights

    weights = patchable_weights(model)
    n = 0
    with torch.no_grad():
        for name, delta in lora_deltas(loras, component, {k: tuple(w.shape) for k, w in weights.items()}):
            weights[name].add_(torch.from_numpy(delta.value()).to(weights[name].dtype))
            n += 1
    return n


def _export_unet_variants(spec, module, unet, trace_inputs, out_dir: Path, opset: int):
    """The UNet twice over one set of weights: ``model.ort.onnx`` with attention as ONNX Runtime's fused
    MultiHeadAttention (the CPU backend's graph), and the portable ``model.onnx`` expanded from it into
    standard ops (TensorRT, OpenVINO, other providers). Returns the portable graph, the data file and the
    variant to check against PyTorch: {"cpu": (path, what the manifest records of it)}."""
    import onnx
    from diffusers.models.attention_processor import AttnProcessor2_0

    from sdrt.export.attention import CONTRIB_DOMAIN, expand_attention, fuse_attention
    from sdrt.export.graphs import export_graph

    original = unet.attn_processors
    fuse_attention(unet)
    try:
        fused, data_file = export_graph(spec, module, trace_inputs, out_dir, opset, name=VARIANT_FILE,
                                        custom_opsets={CONTRIB_DOMAIN: 1}, external=True)
    finally:
        unet.set_attn_processor(original if original else AttnProcessor2_0())
    model = onnx.load(str(fused), load_external_data=False)
    expand_attention(model)
    plain = out_dir / "model.onnx"
    onnx.save_model(model, str(plain))
    del model
    return plain, data_file, {"cpu": (fused, {"described": "fused attention",
                                              "attention": "com.microsoft.MultiHeadAttention"})}


def _variant_entry(comp: str, graph: Path, data_file: str | None, parity: dict, **what) -> dict:
    files = [graph] + ([graph.parent / data_file] if data_file else [])
    digest, size = sha256_files(files)
    return {"file": f"{comp}/{graph.name}", "sha256": digest, "size_bytes": size, **what, "parity": parity}


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_temporaries(engine_dir: Path, log: Callable[[str], None]) -> None:
    """Remove what exports into ``engine_dir`` left when they were killed outright (SIGKILL, a crash, power):
    ``.NAME.tmp-PID``, ``.NAME.add-PID`` (`--add`) and, when ``engine_dir`` itself is in place, ``.NAME.old-PID``
    and `--add`'s hidden files in ``NAME/unet`` (``.STEM.part-PID``, ``.STEM.trace-PID``). The PID says whose: what
    a process that still runs wrote (a concurrent export) is left alone."""
    def stale(pid: str) -> bool:
        return pid.isdigit() and int(pid) != os.getpid() and not _process_exists(int(pid))

    for path in engine_dir.parent.glob(f".{glob.escape(engine_dir.name)}.*-*"):
        kind, _, pid = path.name[len(engine_dir.name) + 2:].partition("-")
        if (kind in ("tmp", "add") or (kind == "old" and engine_dir.is_dir())) and path.is_dir() and stale(pid):
            shutil.rmtree(path, ignore_errors=True)
            log(f"removed {path}, left by an export (process {pid}) that was killed")
    for path in (engine_dir / "unet").glob(".*.*-*") if engine_dir.is_dir() else ():
        kind, _, pid = path.name.rpartition(".")[2].partition("-")
        if kind in ("part", "trace") and stale(pid):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            log(f"removed {path}, left by an export (process {pid}) that was killed")

