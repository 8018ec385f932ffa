"""The four graphs: torch wrappers with the engine directory's input/output names, traced to ONNX.

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


class UNetGraph(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


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


# component -> (wrapper class, the diffusers/transformers model it wraps)
WRAPPERS = {
    "text_encoder": (TextEncoderGraph, "text_encoder"),
    "unet": (UNetGraph, "unet"),
    "vae_decoder": (VaeDecoderGraph, "vae"),
    "vae_encoder": (VaeEncoderGraph, "vae"),
}
# component -> (input names, output names): the engine directory's contract
GRAPH_IO = {
    "text_encoder": (("input_ids",), ("last_hidden_state", "pooler_output")),
    "unet": (("sample", "timestep", "encoder_hidden_states"), ("out_sample",)),
    "vae_decoder": (("latent_sample",), ("sample",)),
    "vae_encoder": (("sample",), ("latent_parameters",)),
}


def graph_module(component: str, models: dict) -> torch.nn.Module:
    """The traced module of ``component``, wrapping ``models`` ({"text_encoder", "unet", "vae"} -> module)."""
    cls, source = WRAPPERS[component]
    return cls(models[source])


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


def graph_specs(numbers: dict) -> dict[str, GraphSpec]:
    """The IO contract of each component, with the model's own numbers filled in."""
    c = numbers["latent_channels"]
    L = numbers["text_max_length"]
    hidden = numbers["text_hidden_size"]
    img_c = numbers["image_channels"]
    f32, i64 = "float32", "int64"
    latent = ("batch", c, "latent_height", "latent_width")
    shapes = {
        "text_encoder": ((i64, ("batch", L)),
                         (f32, ("batch", L, hidden)), (f32, ("batch", hidden))),
        # the UNet reads the text of k prompt chunks, L * k tokens (sdrt.runtime.prompts)
        "unet": ((f32, latent), (f32, ("batch",)), (f32, ("batch", "sequence", hidden)),
                 (f32, latent)),
        "vae_decoder": ((f32, latent),
                        (f32, ("batch", img_c, "height", "width"))),
        "vae_encoder": ((f32, ("batch", img_c, "height", "width")),
                        (f32, ("batch", 2 * c, "latent_height", "latent_width"))),
    }
    specs = {}
    for comp, (ins, outs) in GRAPH_IO.items():
        typed = shapes[comp]
        specs[comp] = GraphSpec(
            comp, lambda m, comp=comp: graph_module(comp, m),
            inputs=tuple((n, *typed[i]) for i, n in enumerate(ins)),
            outputs=tuple((n, *typed[len(ins) + i]) for i, n in enumerate(outs)))
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
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / ".trace"
    scratch.mkdir()
    traced = scratch / "model.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings are about Python-side shape checks that the dynamic axes cover.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, tuple(args[n] for n, _, _ in spec.inputs), str(traced),
            dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[n for n, _, _ in spec.inputs], output_names=[n for n, _, _ in spec.outputs],
            dynamic_axes=spec.dynamic_axes(), custom_opsets=custom_opsets)
    # The exporter scatters big models into one file per tensor; gather them into one file (or none).
    model = onnx.load(str(traced), load_external_data=True)
    weight_bytes = sum(t.ByteSize() for t in model.graph.initializer)
    graph_path = out_dir / name
    if external or weight_bytes > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(graph_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
        data_file = DATA_FILE
        # onnx writes the data file owner-only; give it the mode the graph beside it got (a deployed engine
        # directory is often read by another user than the one who exported it)
        os.chmod(out_dir / DATA_FILE, graph_path.stat().st_mode & 0o777)
    else:
        onnx.save_model(model, str(graph_path))
        data_file = None
    del model
    shutil.rmtree(scratch)
    return graph_path, data_file


def total_bytes(paths: list[Path]) -> int:
    return sum(os.path.getsize(p) for p in paths)
