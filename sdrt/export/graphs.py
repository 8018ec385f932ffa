"""The graphs (text encoders, UNet, VAE decoder and encoder): torch wrappers with the engine directory's input/output names, traced to ONNX.

Names and dynamic axes are a contract (ARCHITECTURE.md): every backend and `sdrt build` rely on them.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sdrt.export.rewrites import linear_as_matmul
from sdrt.runtime.families import family_class

# ONNX protobufs cannot exceed 2 GiB; above this the weights go to one external-data file.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2
DATA_FILE = "model.onnx.data"


class TextEncoderGraph(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, return_dict=False)
        return out[0], out[1]


class PenultimateTextEncoderGraph(torch.nn.Module):
    """SDXL's reading of a CLIP text encoder: the penultimate hidden state (``hidden_states[-2]``, before the
    last layer and the final norm) and, from the encoder with a projection, the pooled projected embedding."""

    def __init__(self, text_encoder, pooled: bool):
        super().__init__()
        self.text_encoder = text_encoder
        self.pooled = pooled

    def unused_weights(self) -> set[str]:
        """The weights (names in the text encoder) the graph does not read: without the pooled output, the
        last layer's. A LoRA's change to them changes nothing, here as in diffusers."""
        if self.pooled:
            return set()
        inner = getattr(self.text_encoder, "text_model", self.text_encoder)  # transformers >= 5.6: no text_model
        last = set(map(id, inner.encoder.layers[-1].modules()))
        return {f"{n}.weight" for n, m in self.text_encoder.named_modules()
                if id(m) in last and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states[-2]
        return (hidden, out.text_embeds) if self.pooled else hidden


class UNetGraph(torch.nn.Module):
    """The UNet; ``extra`` names the conditioning inputs after the first three, in order: SDXL's added
    conditioning (``text_embeds``, ``time_ids``) and an LCM UNet's guidance embedding (``timestep_cond``)."""

    def __init__(self, unet, extra: tuple[str, ...] = ()):
        super().__init__()
        self.unet = unet
        self.extra = tuple(extra)

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        kw = dict(zip(self.extra, extra))
        added = {k: kw[k] for k in ("text_embeds", "time_ids") if k in kw} or None
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=kw.get("timestep_cond"),
                         added_cond_kwargs=added, return_dict=False)[0]


class VaeDecoderGraph(torch.nn.Module):
    """post_quant_conv + decoder: the runtime divides by scaling_factor (and adds shift_factor) before."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderGraph(torch.nn.Module):
    """encoder + quant_conv: mean and logvar stacked on channels; the runtime samples (no RNG in the graph)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        h = self.vae.encoder(sample)
        if self.vae.quant_conv is not None:
            h = self.vae.quant_conv(h)
        return h


# component -> the diffusers/transformers model it wraps
SOURCES = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "unet",
           "vae_decoder": "vae", "vae_encoder": "vae"}


def unet_extra_inputs(numbers: dict) -> tuple[str, ...]:
    """The UNet's inputs after sample, timestep, encoder_hidden_states, for this model."""
    extra = family_class(numbers.get("family")).unet_conditioning
    return extra + (("timestep_cond",) if numbers.get("guidance_embedding_dim") else ())


def graph_io(component: str, numbers: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(input names, output names) of ``component``: the engine directory's contract."""
    if component.startswith("text_encoder"):
        if not family_class(numbers.get("family")).penultimate_text:
            return ("input_ids",), ("last_hidden_state", "pooler_output")
        pooled = component == "text_encoder_2"
        return ("input_ids",), ("penultimate_hidden_state",) + (("text_embeds",) if pooled else ())
    return {
        "unet": (("sample", "timestep", "encoder_hidden_states") + unet_extra_inputs(numbers), ("out_sample",)),
        "vae_decoder": (("latent_sample",), ("sample",)),
        "vae_encoder": (("sample",), ("latent_parameters",)),
    }[component]


def graph_module(component: str, models: dict, numbers: dict) -> torch.nn.Module:
    """The traced module of ``component``, wrapping ``models`` (SOURCES' values -> module)."""
    model = models[SOURCES[component]]
    if component.startswith("text_encoder"):
        if not family_class(numbers.get("family")).penultimate_text:
            return TextEncoderGraph(model)
        return PenultimateTextEncoderGraph(model, pooled=component == "text_encoder_2")
    if component == "unet":
        return UNetGraph(model, unet_extra_inputs(numbers))
    return {"vae_decoder": VaeDecoderGraph, "vae_encoder": VaeEncoderGraph}[component](model)


@dataclass(frozen=True)
class GraphSpec:
    """How to trace one component: its wrapper, IO names, symbolic shapes and example inputs."""

    name: str
    wrap: Callable[[dict], torch.nn.Module]
    inputs: tuple[tuple[str, str, tuple], ...]    # (name, dtype, shape with symbols)
    outputs: tuple[tuple[str, str, tuple], ...]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {name: {i: d for i, d in enumerate(shape) if isinstance(d, str)}
                for name, _, shape in self.inputs + self.outputs}


def _text_encoder_widths(numbers: dict) -> dict[str, dict]:
    encoders = numbers.get("text_encoders") or [{"component": "text_encoder", "hidden_size": numbers["text_hidden_size"]}]
    return {e["component"]: e for e in encoders}


def graph_specs(numbers: dict, components=None) -> dict[str, GraphSpec]:
    """The IO contract of each component (those the model has), with the model's own numbers filled in."""
    c = numbers["latent_channels"]
    L = numbers["text_max_length"]
    img_c = numbers["image_channels"]
    f32, i64 = "float32", "int64"
    latent = ("batch", c, "latent_height", "latent_width")
    unet_in = numbers.get("unet_in_channels", c)   # an inpainting UNet: latents, mask, masked-image latents
    shapes = {  # name -> (dtype, shape)
        "sample": (f32, ("batch", unet_in, "latent_height", "latent_width")), "timestep": (f32, ("batch",)),
        # the UNet reads the text of k prompt chunks, L * k tokens (sdrt.runtime.prompts)
        "encoder_hidden_states": (f32, ("batch", "sequence", numbers["text_hidden_size"])),
        "text_embeds": (f32, ("batch", numbers.get("pooled_dim"))),
        "time_ids": (f32, ("batch", len(numbers.get("time_ids") or ()))),
        "timestep_cond": (f32, ("batch", numbers.get("guidance_embedding_dim"))),
        "out_sample": (f32, latent), "latent_sample": (f32, latent),
        "input_ids": (i64, ("batch", L)),
    }
    image = (f32, ("batch", img_c, "height", "width"))
    specs = {}
    encoders = _text_encoder_widths(numbers)
    for comp in list(encoders) + ["unet", "vae_decoder", "vae_encoder"]:
        ins, outs = graph_io(comp, numbers)
        local = dict(shapes)
        if comp in encoders:
            width = encoders[comp]["hidden_size"]
            local.update({"last_hidden_state": (f32, ("batch", L, width)),
                          "penultimate_hidden_state": (f32, ("batch", L, width)),
                          "pooler_output": (f32, ("batch", width)),
                          "text_embeds": (f32, ("batch", encoders[comp].get("projection_dim")))})
        elif comp == "vae_decoder":
            local["sample"] = image
        elif comp == "vae_encoder":
            local.update(sample=image, latent_parameters=(f32, ("batch", 2 * c, "latent_height", "latent_width")))
        specs[comp] = GraphSpec(
            comp, lambda m, comp=comp: graph_module(comp, m, numbers),
            inputs=tuple((n, *local[n]) for n in ins), outputs=tuple((n, *local[n]) for n in outs))
    return specs


def example_inputs(spec: GraphSpec, numbers: dict, batch: int, latent_h: int, latent_w: int, chunks: int,
                   vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Random inputs of the given sizes (symbols resolved; ``chunks`` prompt chunks), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    f = numbers["vae_scale_factor"]
    sizes = {"batch": batch, "latent_height": latent_h, "latent_width": latent_w,
             "height": latent_h * f, "width": latent_w * f, "sequence": numbers["text_max_length"] * chunks}
    out = {}
    for name, dtype, shape in spec.inputs:
        shp = tuple(sizes[d] if isinstance(d, str) else d for d in shape)
        if dtype == "int64":
            out[name] = torch.randint(0, vocab_size, shp, generator=g, dtype=torch.int64)
        elif name == "time_ids":  # sizes and crops in pixels (an aesthetic score is within that range too)
            out[name] = torch.randint(0, 1024, shp, generator=g).to(torch.float32)
        elif name == "timestep":
            out[name] = torch.randint(0, 1000, shp, generator=g).to(torch.float32)
        elif name == "sample" and spec.name == "vae_encoder":
            out[name] = torch.rand(shp, generator=g) * 2 - 1  # an image in [-1, 1]
        else:
            out[name] = torch.randn(shp, generator=g)
    return out


def export_graph(spec: GraphSpec, module: torch.nn.Module, args: dict[str, torch.Tensor], out_dir: Path,
                 opset: int, name: str = "model.onnx", custom_opsets: dict | None = None,
                 external: bool = False) -> tuple[Path, str | None]:
    """Trace ``module`` to ``out_dir/name``; weights over 2 GiB (or any, with ``external``: for a variant graph
    that shares them) go to one external-data file (model.onnx.data).

    Returns the graph path and the data file's name (or None when the weights are inside the graph).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / ".trace"
    scratch.mkdir()
    traced = scratch / "model.onnx"
    # Linear weights stored transposed while tracing: otherwise the exporter folds a transposed copy of each
    # beside the model's own (sdrt.export.rewrites)
    with torch.no_grad(), warnings.catch_warnings(), linear_as_matmul(module):
        # Tracer warnings are about Python-side shape checks that the dynamic axes cover.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, tuple(args[n] for n, _, _ in spec.inputs), str(traced),
            dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[n for n, _, _ in spec.inputs], output_names=[n for n, _, _ in spec.outputs],
            dynamic_axes=spec.dynamic_axes(), custom_opsets=custom_opsets)
    graph_path = out_dir / name
    data_file = gather_weights(traced, graph_path, external=external)
    shutil.rmtree(scratch)
    return graph_path, data_file


def gather_weights(traced: Path, graph_path: Path, external: bool = False, threshold: int = 1024) -> str | None:
    """Write the graph at ``traced`` to ``graph_path`` with its weights inside it, or, when they exceed
    EXTERNAL_DATA_THRESHOLD (or with ``external``), every initializer over ``threshold`` bytes in one
    external-data file beside it (DATA_FILE); returns that file's name or None.

    Tensor by tensor: the graph is read without its external data, and each weight is copied from wherever the
    tracer put it (its own file for a model over 2 GiB, or the graph's bytes) into the data file, by the kernel
    where it can. Memory stays at one graph without weights plus one tensor, however big the model; loading the
    whole model into one ModelProto would hold every weight a second time beside the PyTorch model's.
    Each tensor of the data file starts at a multiple of ALIGNMENT, so a runtime can map it in place.
    """
    import onnx

    model = onnx.load(str(traced), load_external_data=False)
    inits = list(model.graph.initializer)
    if not (external or any(_is_external(t) for t in inits) or sum(_nbytes(t) for t in inits) > EXTERNAL_DATA_THRESHOLD):
        onnx.save_model(model, str(graph_path))
        return None
    data_path = graph_path.parent / DATA_FILE
    part = data_path.with_name(f".{DATA_FILE}.part-{os.getpid()}")
    try:
        with open(part, "wb") as out:
            for t in inits:
                if _is_external(t):
                    info = {e.key: e.value for e in t.external_data}
                    src = traced.parent / info["location"]
                    offset = int(info.get("offset") or 0)
                    length = int(info["length"]) if info.get("length") else src.stat().st_size - offset
                    start = _pad(out)
                    with open(src, "rb") as f:
                        _copy_range(f, out, offset, length)
                elif t.HasField("raw_data") and len(t.raw_data) > threshold:
                    start = _pad(out)
                    length = len(t.raw_data)
                    out.write(t.raw_data)
                    t.ClearField("raw_data")
                else:
                    continue  # small, or in typed fields (the tracer writes raw bytes): left in the graph
                del t.external_data[:]
                for key, value in (("location", DATA_FILE), ("offset", str(start)), ("length", str(length))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
                t.data_location = onnx.TensorProto.EXTERNAL
        onnx.save_model(model, str(graph_path))
        # give the data file the mode the graph beside it got (a deployed engine directory is often read by
        # another user than the one who exported it)
        os.chmod(part, graph_path.stat().st_mode & 0o777)
        os.replace(part, data_path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return DATA_FILE


ALIGNMENT = 4096  # a page: where each tensor of an external-data file starts
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


def _is_external(t) -> bool:
    return t.data_location == 1  # TensorProto.EXTERNAL


def _nbytes(t) -> int:
    count = 1
    for d in t.dims:
        count *= d
    return count * _ITEMSIZE.get(t.data_type, 4)


def _pad(out) -> int:
    """Pad ``out`` to the next multiple of ALIGNMENT; returns the offset."""
    pos = out.tell()
    start = -(-pos // ALIGNMENT) * ALIGNMENT
    if start > pos:
        out.write(b"\0" * (start - pos))
    return start


def _copy_range(src, dst, offset: int, length: int, chunk: int = 64 * 1024**2) -> None:
    """Copy ``length`` bytes at ``offset`` of ``src`` to the end of ``dst`` (kernel-side where it can)."""
    dst.flush()
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src.fileno(), dst.fileno(), length - done, offset + done)
            if n == 0:
                break
            done += n
    except (AttributeError, OSError):
        pass  # no copy_file_range (another OS, another filesystem): copy through a buffer
    dst.seek(0, os.SEEK_END)
    src.seek(offset + done)
    while done < length:
        buf = src.read(min(chunk, length - done))
        if not buf:
            raise ValueError(f"{src.name}: shorter than the {length} bytes its graph says it holds")
        dst.write(buf)
        done += len(buf)


def total_bytes(paths: list[Path]) -> int:
    return sum(os.path.getsize(p) for p in paths)
