"""`sdrt export --controlnet DIR[:NAME]`: ControlNets and T2I-Adapters, each its own parity-gated graph, and the UNet
graphs that take what they compute (names and manifest records: sdrt.runtime.control).

* ``controlnet/NAME`` (a ControlNet): sample, timestep, encoder_hidden_states, controlnet_cond [, text_embeds,
  time_ids] -> down_residual_0..N-1, mid_residual, at conditioning scale 1 (the runtime scales; see
  sdrt.runtime.control).
* ``controlnet/NAME`` (a T2I-Adapter): controlnet_cond -> adapter_feature_0..K-1 (the features the UNet takes).
* ``unet_control``: the UNet's inputs + down_residual_0..N-1, mid_residual -> out_sample (diffusers'
  ``down_block_additional_residuals`` and ``mid_block_additional_residual``).
* ``unet_adapter``: the UNet's inputs + adapter_feature_0..K-1 -> out_sample (``down_intrablock_additional_residuals``).

The two UNet graphs are written into ``unet/`` (``control.onnx``, ``adapter.onnx`` and their CPU variants) over
the UNet's own weights file: they add no weight, so they add no bytes, and each of their initializers keeps the
name the UNet graph gives the same weight (run-time LoRAs patch them alike). They are graphs of their own, not the
plain UNet fed zeros, so the plain path runs exactly what it ran before (README: the measurement).

A ControlNet is a diffusers ``ControlNetModel`` folder, or one ``.safetensors`` file in the original layout
(``control_model.*`` keys, as ``control_*.safetensors`` of the ControlNet web UI extension; or the same keys
without the prefix), converted offline by diffusers' ``from_single_file`` with a config made from the base
UNet's and the file's conditioning embedding. A T2I-Adapter is a diffusers ``T2IAdapter`` folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from sdrt.errors import UserError
from sdrt.runtime.control import (CONTROL_IMAGE, CONTROLNET, CONTROLNETS, FIT_KEYS, MID_RESIDUAL, T2I_ADAPTER, UNET_ADAPTER,
                                  UNET_CONTROL, adapter_feature, check_name, control_component, down_residual)
from sdrt.runtime.manifest import sha256_files
from sdrt.runtime.safetensors_file import SafetensorsFile

ORIGINAL_PREFIX = "control_model."
HINT_KEY = "input_hint_block.0.weight"
UNET_GRAPH_FILES = {UNET_CONTROL: "control", UNET_ADAPTER: "adapter"}  # unet/<stem>.onnx and <stem>.ort.onnx
# diffusers' converter names the conditioning embedding's last convolution input_hint_block.14: 4 levels
ORIGINAL_EMBEDDING_LEVELS = 4


@dataclass
class ControlSource:
    """One ``--controlnet`` argument, inspected: what it is and the config it loads with."""

    path: Path
    name: str
    kind: str                      # CONTROLNET or T2I_ADAPTER
    config: dict
    format: str                    # "diffusers" | "original"
    files: list[Path] = field(default_factory=list)   # what its sha256 is taken over

    @property
    def component(self) -> str:
        return control_component(self.name)

    @property
    def unet_graph(self) -> str:
        return UNET_CONTROL if self.kind == CONTROLNET else UNET_ADAPTER


def parse_control_arg(text) -> tuple[Path, str]:
    """``"PATH[:NAME]"`` or ``(path, name)`` -> (path, name); the name defaults to the folder's or file's name
    (a ``control_`` prefix and the suffix dropped)."""
    if isinstance(text, (tuple, list)):
        path, name = Path(text[0]), text[1]
    else:
        text = os.fspath(text)
        head, sep, tail = text.rpartition(":")
        path, name = (Path(head), tail) if sep and head and not Path(text).exists() else (Path(text), None)
    if name is None:
        stem = path.name[:-len(".safetensors")] if path.name.endswith(".safetensors") else path.name
        name = stem[len("control_"):] if stem.startswith("control_") and len(stem) > len("control_") else stem
    return path, check_name(name)


def inspect_control(arg, unet_config: dict, numbers: dict, allow_pickle: bool = False) -> ControlSource:
    """Read ``arg``'s config (or the single file's header) and refuse, in one line, what does not fit the model."""
    from sdrt.export.checkpoint import check_weights

    path, name = parse_control_arg(arg)
    where = f"--controlnet {str(path)!r}"
    if path.is_file():
        source = _inspect_original(path, name, unet_config, where)
    elif (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{where}: unreadable config.json ({e})") from None
        cls = config.get("_class_name")
        kinds = {"ControlNetModel": CONTROLNET, "T2IAdapter": T2I_ADAPTER}
        if cls not in kinds:
            raise UserError(f"{where}: its config names {cls!r}; expected ControlNetModel or T2IAdapter (diffusers)")
        check_weights(path, allow_pickle)
        files = [path / "config.json"] + sorted(p for p in path.iterdir() if p.suffix == ".safetensors"
                                                 or (allow_pickle and p.suffix == ".bin"))
        source = ControlSource(path, name, kinds[cls], config, "diffusers", files)
    else:
        raise UserError(f"{where}: not a diffusers ControlNetModel/T2IAdapter folder (no config.json) nor a "
                        ".safetensors file")
    check_fits(source, unet_config, numbers, where)
    return source


def _inspect_original(path: Path, name: str, unet_config: dict, where: str) -> ControlSource:
    """An original-layout ControlNet file: its keys say so, its shapes say which conditioning embedding; the rest
    of its config is the base UNet's (check_fits then compares the file's shapes with it)."""
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{where}: a single-file ControlNet must be a .safetensors file")
    header = SafetensorsFile(path)
    shapes = {k: header.shape(k) for k in header.keys()}
    prefix = ORIGINAL_PREFIX if ORIGINAL_PREFIX + HINT_KEY in shapes else ""
    if prefix + HINT_KEY not in shapes or prefix + "zero_convs.0.0.weight" not in shapes:
        sample = ", ".join(sorted(shapes)[:3])
        raise UserError(f"{where}: not an original-layout ControlNet (no {ORIGINAL_PREFIX}{HINT_KEY} or "
                        f"zero_convs.0.0.weight; found {sample}, ...)")
    shapes = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    hint = sorted(int(k.split(".")[1]) for k in shapes if k.startswith("input_hint_block.") and k.endswith(".weight"))
    # conv_in (0), then pairs (C -> C, C -> C' with stride 2), then conv_out: the levels' channels are conv_in's
    # output and each pair's second output
    embedding = [shapes[HINT_KEY][0]] + [shapes[f"input_hint_block.{i}.weight"][0] for i in hint[2:-1:2]]
    if len(embedding) != ORIGINAL_EMBEDDING_LEVELS:
        raise UserError(f"{where}: its conditioning embedding has {len(embedding)} levels; diffusers converts "
                        f"original-layout files with {ORIGINAL_EMBEDDING_LEVELS}")
    keys = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
            "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
            "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim", "num_attention_heads",
            "use_linear_projection", "class_embed_type", "num_class_embeds", "upcast_attention",
            "resnet_time_scale_shift", "projection_class_embeddings_input_dim", "mid_block_type",
            "transformer_layers_per_block", "addition_embed_type", "addition_time_embed_dim")
    config = {"_class_name": "ControlNetModel", **{k: unet_config[k] for k in keys if k in unet_config},
              "conditioning_embedding_out_channels": embedding, "conditioning_channels": shapes[HINT_KEY][1]}
    # what the file's shapes say, for check_fits: conv_in, the cross-attention width, the zero convolutions
    conv_in = shapes.get("input_blocks.0.0.weight", (0, 0))
    context = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    found = {"in_channels": conv_in[1], "block_out_channels[0]": conv_in[0],
             "residuals": len([k for k in shapes if k.startswith("zero_convs.") and k.endswith(".weight")]),
             "block_out_channels[-1]": shapes.get("middle_block_out.0.weight", (0,))[0]}
    if context is not None:
        found["cross_attention_dim"] = context
    config["_file_shapes"] = found
    return ControlSource(path, name, CONTROLNET, config, "original", [path])


def residual_count(config: dict) -> int:
    """How many down residuals a ControlNet gives (and its UNet takes): conv_in's, then per block one per layer
    and one for its downsampler (every block but the last)."""
    blocks = len(config["block_out_channels"])
    return 1 + blocks * config["layers_per_block"] + blocks - 1


def fit_record(config: dict) -> dict:
    """The UNet numbers a ControlNet must share with its UNet (sdrt.runtime.control.FIT_KEYS), lists as lists."""
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in ((k, config.get(k)) for k in FIT_KEYS)}


def check_fits(source: ControlSource, unet_config: dict, numbers: dict, where: str) -> None:
    """One line naming the first number in which ``source`` was made for another model."""
    cfg, factor = source.config, numbers["vae_scale_factor"]
    if source.kind == T2I_ADAPTER:
        features, slots = adapter_features(cfg, factor), unet_adapter_slots(unet_config)
        for k, (got, want) in enumerate(zip(features or (), slots)):
            if got != want:
                raise UserError(f"{where}: a T2I-Adapter whose feature {k} has {got[0]} channels at 1/2^{got[1]} of "
                                f"the latent size; this model's UNet adds {want[0]} at 1/2^{want[1]} there (made for "
                                "another model)")
        return
    for key in FIT_KEYS:
        want, got = unet_config.get(key), cfg.get(key)
        if isinstance(want, (list, tuple)) or isinstance(got, (list, tuple)):
            want, got = list(want or ()), list(got or ())
        if want != got:
            raise UserError(f"{where}: a ControlNet for a UNet with {key}={got!r}; this model's has {want!r} "
                            "(made for another model)")
    for key, got in cfg.get("_file_shapes", {}).items():
        want = {"in_channels": unet_config["in_channels"], "block_out_channels[0]": unet_config["block_out_channels"][0],
                "block_out_channels[-1]": unet_config["block_out_channels"][-1],
                "residuals": residual_count(unet_config),
                "cross_attention_dim": unet_config.get("cross_attention_dim")}[key]
        if got != want:
            raise UserError(f"{where}: the file's shapes give {key}={got}; this model's UNet has {want} (made for "
                            "another model)")
    levels = len(cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256))
    if 2 ** (levels - 1) != factor:
        raise UserError(f"{where}: its conditioning embedding downsamples the control image {2 ** (levels - 1)}x; "
                        f"this model's latents are 1/{factor} of the image (made for another model)")
    if cfg.get("conditioning_channels", 3) != 3:
        raise UserError(f"{where}: it takes {cfg.get('conditioning_channels')}-channel control images; sdrt prepares "
                        "RGB (3)")
    if cfg.get("controlnet_conditioning_channel_order", "rgb") not in ("rgb", "bgr"):
        raise UserError(f"{where}: conditioning channel order {cfg['controlnet_conditioning_channel_order']!r}; "
                        "diffusers knows rgb and bgr")


def load_control(source: ControlSource, allow_pickle: bool):
    """The PyTorch module (float32, eval), weights in the process's memory."""
    import torch
    from diffusers import ControlNetModel, T2IAdapter

    where = f"--controlnet {str(source.path)!r}"
    try:
        if source.format == "original":
            with tempfile.TemporaryDirectory(prefix="sdrt-controlnet-") as configs:
                config = {k: v for k, v in source.config.items() if not k.startswith("_file")}
                (Path(configs) / "config.json").write_text(json.dumps(config))
                model = ControlNetModel.from_single_file(str(source.path), config=configs, local_files_only=True,
                                                         torch_dtype=torch.float32)
        else:
            cls = ControlNetModel if source.kind == CONTROLNET else T2IAdapter
            model = cls.from_pretrained(source.path, use_safetensors=None if allow_pickle else True,
                                        torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{where}: could not load its weights ({str(e).splitlines()[0][:300]})") from None
    return model.eval()


# ---- the graphs ----------------------------------------------------------------------------------------------
def _added(names: tuple[str, ...], values) -> dict | None:
    kw = dict(zip(names, values))
    return {k: kw[k] for k in ("text_embeds", "time_ids") if k in kw} or None


def _graphs():
    """The wrapper classes (torch imported only when an export needs them)."""
    import torch

    class ControlNetGraph(torch.nn.Module):
        """The ControlNet at conditioning scale 1: its down residuals, then the mid residual."""

        def __init__(self, controlnet, extra: tuple[str, ...]):
            super().__init__()
            self.controlnet, self.extra = controlnet, extra

        def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, *extra):
            down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond,
                                        added_cond_kwargs=_added(self.extra, extra), return_dict=False)
            return (*down, mid)

    class AdapterGraph(torch.nn.Module):
        """The T2I-Adapter's first ``count`` features (those the UNet reads)."""

        def __init__(self, adapter, count: int):
            super().__init__()
            self.adapter, self.count = adapter, count

        def forward(self, controlnet_cond):
            return tuple(self.adapter(controlnet_cond)[:self.count])

    class UNetResidualGraph(torch.nn.Module):
        """The UNet (named ``unet``, as in sdrt.export.graphs.UNetGraph, so its weights get the same names) with
        a ControlNet's residuals or a T2I-Adapter's features after its usual inputs."""

        def __init__(self, unet, extra: tuple[str, ...], kind: str):
            super().__init__()
            self.unet, self.extra, self.kind = unet, extra, kind

        def forward(self, sample, timestep, encoder_hidden_states, *rest):
            extra, residuals = rest[:len(self.extra)], list(rest[len(self.extra):])
            kw = dict(zip(self.extra, extra))
            if self.kind == CONTROLNET:
                more = {"down_block_additional_residuals": residuals[:-1], "mid_block_additional_residual": residuals[-1]}
            else:  # diffusers adds them in place, popping the list: hand it copies
                more = {"down_intrablock_additional_residuals": [r.clone() for r in residuals]}
            return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=kw.get("timestep_cond"),
                             added_cond_kwargs=_added(self.extra, extra), return_dict=False, **more)[0]

    return ControlNetGraph, AdapterGraph, UNetResidualGraph


def _levels(shapes: list[tuple[int, ...]], latent: tuple[int, int]) -> list[int]:
    """Each output's downsampling level: k where its size is the latent size halved k times, rounding up."""
    out = []
    for s in shapes:
        k = next((k for k in range(16) if s[2:] == tuple(-(-v // 2 ** k) for v in latent)), None)
        if k is None:
            raise UserError(f"an output of size {s[2:]} is no halving of the latent size {latent}")
        out.append(k)
    return out


def _symbolic(name: str, shape, level: int) -> tuple:
    dims = ("latent_height", "latent_width") if level == 0 else (f"latent_height_{level}", f"latent_width_{level}")
    return name, "float32", ("batch", int(shape[1]), *dims)


@dataclass
class ControlExport:
    """What one run of export_controls wrote: manifest entries, the folders written (relative to the stage), and
    the UNet graphs written beside their final names (part, final) for the caller to rename."""

    components: dict
    records: dict
    folders: list[str]
    renames: list[tuple[Path, Path]]


def export_controls(sources: Sequence[ControlSource], *, stage: Path, engine: Path, ckpt, numbers: dict,
                    unet_spec, present: Sequence[str], lora_files, opset: int, cpu_variants: bool, allow_pickle: bool,
                    log: Callable[[str], None]) -> ControlExport:
    """Export each source's graph into ``stage/controlnet/NAME`` and the UNet graphs they need that ``present``
    (the engine's components) lacks, beside ``engine/unet/model.onnx`` over its weights file (``*.part-PID`` names
    the caller renames into place). ``unet_spec``: the UNet's GraphSpec; ``lora_files``: the LoRAs fused into the
    engine's UNet (fused again here, so the weights match)."""
    import torch

    from sdrt.export.exporter import _entry, _release_memory, _shapes
    from sdrt.export.graphs import GraphSpec, example_inputs
    from sdrt.export.parity import compare, torch_outputs

    ControlNetGraph, AdapterGraph, UNetResidualGraph = _graphs()
    multiple = 2 ** (len(ckpt.unet_config["block_out_channels"]) - 1)
    shapes = _shapes(numbers, multiple)
    vocab = int(ckpt.text_config.get("vocab_size", 49408))
    unet_inputs = unet_spec.inputs
    # ControlNets read the UNet's inputs but an LCM UNet's guidance embedding
    base_inputs = tuple(i for i in unet_inputs if i[0] != "timestep_cond")
    image = (CONTROL_IMAGE, "float32", ("batch", 3, "height", "width"))
    out = ControlExport({}, {}, [], [])
    examples: dict[str, tuple] = {}  # UNet graph -> (residual specs, trace and check residuals, shapes) of a source
    for src in sources:
        t0 = time.perf_counter()
        # an adapter's image must divide by its unshuffle: latent sizes that are multiples of what that makes
        ratio = max(1, src.config.get("downscale_factor", 1) // numbers["vae_scale_factor"]) \
            if src.kind == T2I_ADAPTER else 1
        trace_shape, check_shape = (_fit_shape(s, ratio, multiple) for s in shapes)
        model = load_control(src, allow_pickle)
        trace = example_inputs(unet_spec, numbers, *trace_shape, vocab, seed=0)
        check = example_inputs(unet_spec, numbers, *check_shape, vocab, seed=1)
        f = numbers["vae_scale_factor"]
        for inputs, (b, h, w, _), seed in ((trace, trace_shape, 2), (check, check_shape, 3)):
            g = torch.Generator().manual_seed(seed)
            inputs[CONTROL_IMAGE] = torch.rand((b, 3, h * f, w * f), generator=g)
        if src.kind == CONTROLNET:
            extra = tuple(n for n, _, _ in base_inputs[3:])
            module = ControlNetGraph(model, extra).eval()
            names = (*(n for n, _, _ in base_inputs[:3]), CONTROL_IMAGE, *extra)
        else:
            module = AdapterGraph(model, _features_read(ckpt.unet_config, model.config, numbers["vae_scale_factor"])).eval()
            names = (CONTROL_IMAGE,)
        trace_in = {n: trace[n] for n in names}
        check_in = {n: check[n] for n in names}
        with torch.no_grad():
            traced_out = module(*trace_in.values())
        latent = tuple(trace_shape[1:3])
        levels = _levels([tuple(o.shape) for o in traced_out], latent)
        if src.kind == CONTROLNET:
            out_names = [down_residual(i) for i in range(len(traced_out) - 1)] + [MID_RESIDUAL]
        else:
            out_names = [adapter_feature(i) for i in range(len(traced_out))]
        outputs = tuple(_symbolic(n, o.shape, k) for n, o, k in zip(out_names, traced_out, levels))
        inputs = tuple(next(i for i in base_inputs + (image,) if i[0] == n) for n in names)
        spec = GraphSpec(src.component, lambda m, graph=module: graph, inputs, outputs)
        expected = torch_outputs(module, check_in)
        folder = stage / src.component
        graph, data_file, variants = _export_with_variants(spec, module, model, trace_in, folder, opset, cpu_variants)
        examples.setdefault(src.unet_graph, (outputs, list(traced_out), [torch.from_numpy(e) for e in expected],
                                             trace_shape, check_shape))
        del module, model, traced_out
        _release_memory()
        parity = compare(src.component, graph, expected, check_in, out_names)
        variants = _checked(src.component, variants, data_file, expected, check_in, out_names)
        out.components[src.component] = _entry(src.component, spec, graph, data_file, parity, variants, t0, log)
        out.records[src.name] = _record(src, out.components[src.component], ckpt.unet_config)
        out.folders.append(src.component)
    for comp, (res_specs, trace_res, check_res, trace_shape, check_shape) in examples.items():
        if comp in present:
            continue
        out.components[comp], renames = _export_unet_graph(
            comp, UNetResidualGraph, ckpt, numbers, unet_spec, res_specs, trace_res, check_res, trace_shape,
            check_shape, vocab, engine, lora_files, opset, cpu_variants, allow_pickle, log)
        out.renames += renames
    return out


def adapter_features(config: dict, vae_factor: int) -> list[tuple[int, int]] | None:
    """A T2I-Adapter's features as (channels, level): level k is the latent size halved k times. ``full_adapter``
    unshuffles by ``downscale_factor`` and halves after its first block; ``full_adapter_xl`` halves once, before
    its third. None for a type not worked out here (the UNet's trace checks it)."""
    channels = list(config.get("channels", (320, 640, 1280, 1280)))
    kind = config.get("adapter_type", "full_adapter")
    ratio = config.get("downscale_factor", 16 if kind == "full_adapter_xl" else 8) / vae_factor
    base = int(math.log2(ratio)) if ratio >= 1 and float(ratio).is_integer() else -1
    if kind == "full_adapter":
        return [(c, base + k) for k, c in enumerate(channels)]
    if kind == "full_adapter_xl":
        return [(c, base + (k >= 2)) for k, c in enumerate(channels)]
    return None


def unet_adapter_slots(unet_config: dict) -> list[tuple[int, int]]:
    """Where diffusers' UNet adds a T2I-Adapter's features, as (channels, level): in each down block (a
    cross-attention block before its downsampler, a plain one after it), then in the mid block (where the shape
    agrees)."""
    blocks, types = unet_config["block_out_channels"], unet_config["down_block_types"]
    n = len(blocks)
    slots = [(c, i if "CrossAttn" in t or i == n - 1 else i + 1) for i, (c, t) in enumerate(zip(blocks, types))]
    return slots + [(blocks[-1], n - 1)]


def _fit_shape(shape: tuple, ratio: int, multiple: int) -> tuple:
    """(batch, latent_h, latent_w, chunks) with each latent side made a multiple of ``ratio`` and, where it was
    not a multiple of the UNet's downsampling ``multiple``, kept off one if ``ratio`` allows (exporter._shapes:
    the graph must learn the upsampling to the skip connection's size)."""
    def side(v: int) -> int:
        up = -(-v // ratio) * ratio
        return up + ratio if v % multiple and up % multiple == 0 and ratio < multiple else up

    return shape if ratio == 1 else (shape[0], side(shape[1]), side(shape[2]), shape[3])


def _features_read(unet_config: dict, adapter_config, vae_factor: int) -> int:
    """How many of a T2I-Adapter's features the UNet adds: one per down block, and the next in the mid block
    where its shape agrees (SDXL's adapters)."""
    count, blocks = len(adapter_config.channels), len(unet_config["block_out_channels"])
    features = adapter_features(dict(adapter_config), vae_factor)
    if count <= blocks:
        return count
    mid_fits = features is None or features[blocks] == unet_adapter_slots(unet_config)[blocks]
    return blocks + 1 if mid_fits else blocks


def _record(src: ControlSource, entry: dict, unet_config: dict) -> dict:
    cfg = src.config
    record = {"kind": src.kind, "component": src.component, "unet": src.unet_graph,
              "residuals": [o["name"] for o in entry["outputs"]], "outputs": entry["outputs"],
              "image_input": CONTROL_IMAGE,
              "source": {"path": str(src.path.resolve()), "sha256": sha256_files(src.files)[0], "format": src.format},
              "base": fit_record(unet_config)}
    if src.kind == CONTROLNET:
        record["global_pool_conditions"] = bool(cfg.get("global_pool_conditions", False))
        record["image_multiple"] = 2 ** (len(cfg.get("conditioning_embedding_out_channels") or (0,) * 4) - 1)
    else:
        # its pixel unshuffle needs whole blocks (diffusers' adapter pipelines round the size down to them)
        record["image_multiple"] = int(cfg.get("downscale_factor", 8))
        record["adapter_type"] = cfg.get("adapter_type", "full_adapter")
    return record


def _export_with_variants(spec, module, model, trace_in, folder: Path, opset: int, cpu_variants: bool):
    """The graph as the exporter writes the UNet (fused-attention CPU variant and the portable graph expanded from
    it, GEGLU split), for a module with attention; else the plain trace."""
    from sdrt.export.exporter import _export_unet_variants
    from sdrt.export.graphs import export_graph
    from sdrt.export.rewrites import split_geglu

    has_attention = bool(getattr(model, "attn_processors", None))
    with split_geglu(model):
        if cpu_variants and has_attention:
            return _export_unet_variants(spec, module, model, trace_in, folder, opset)
        graph, data_file = export_graph(spec, module, trace_in, folder, opset)
        return graph, data_file, {}


def _checked(comp, variants, data_file, expected, check_in, names):
    from sdrt.export.exporter import _checked_variants

    return _checked_variants(comp, variants, data_file, expected, check_in, names)


def _export_unet_graph(comp, UNetResidualGraph, ckpt, numbers, unet_spec, res_specs, trace_res, check_res,
                       trace_shape, check_shape, vocab, engine: Path, lora_files, opset, cpu_variants, allow_pickle,
                       log):
    """``unet_control`` or ``unet_adapter``: traced in a scratch folder, its weights pointed into the engine UNet's
    weights file (share_weights), checked against PyTorch there, as ``unet/.<stem>*.part-PID``."""
    from sdrt.export.exporter import _entry, _load_source, _release_memory, fuse_loras, log_entry
    from sdrt.export.graphs import GraphSpec, example_inputs
    from sdrt.export.parity import compare, torch_outputs

    t0 = time.perf_counter()
    kind = CONTROLNET if comp == UNET_CONTROL else T2I_ADAPTER
    unet = _load_source(ckpt, "unet", allow_pickle)
    fuse_loras(unet, "unet", lora_files)
    extra = tuple(n for n, _, _ in unet_spec.inputs[3:])
    module = UNetResidualGraph(unet, extra, kind).eval()
    spec = GraphSpec(comp, lambda m, graph=module: graph, unet_spec.inputs + tuple(res_specs), unet_spec.outputs)
    trace = example_inputs(unet_spec, numbers, *trace_shape, vocab, seed=0)
    check = example_inputs(unet_spec, numbers, *check_shape, vocab, seed=1)
    trace.update({n: t for (n, _, _), t in zip(res_specs, trace_res)})
    check.update({n: t for (n, _, _), t in zip(res_specs, check_res)})
    names = [n for n, _, _ in spec.outputs]
    try:
        expected = torch_outputs(module, check)
    except RuntimeError as e:  # shapes that do not add up: made for another model
        raise UserError(f"{comp}: the UNet cannot take these residuals ({str(e).splitlines()[0][:200]})") from None
    unet_dir = engine / "unet"
    scratch = unet_dir / f".{UNET_GRAPH_FILES[comp]}.trace-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        graph, data_file, variants = _export_with_variants(spec, module, unet, trace, scratch, opset, cpu_variants)
        del module, unet, trace
        _release_memory()
        stem = UNET_GRAPH_FILES[comp]
        base_graph = unet_dir / "model.onnx"
        parts = {}
        for path, final in [(graph, f"{stem}.onnx")] + [(p, f"{stem}.ort.onnx") for p, _ in variants.values()]:
            part = unet_dir / f".{final}.part-{os.getpid()}"
            share_weights(path, base_graph, part)
            parts[path] = part
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    graph_part = parts[graph]
    parity = compare(comp, graph_part, expected, check, names)
    variants = {k: (parts[p], what) for k, (p, what) in variants.items()}
    variants = _checked(comp, variants, "model.onnx.data", expected, check, names)
    entry = _entry(comp, spec, graph_part, "model.onnx.data", parity, variants, t0, None, base=fit_record(ckpt.unet_config))
    # the manifest names the files they will have once renamed into place
    entry["file"] = f"unet/{stem}.onnx"
    for v in entry.get("variants", {}).values():
        v["file"] = f"unet/{stem}.ort.onnx"
    log_entry(comp, entry, log)
    return entry, [(part, unet_dir / (f"{stem}.onnx" if p == graph else f"{stem}.ort.onnx")) for p, part in parts.items()]


def share_weights(graph: Path, base_graph: Path, out: Path) -> None:
    """Write ``graph`` to ``out`` with each of its external weights read from ``base_graph``'s data file instead of
    its own, renamed to the base graph's name for it (where that name is free): matched by name and bytes, else by
    bytes alone. A weight the base graph lacks means the two were not traced from the same weights: refused."""
    import hashlib

    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    base = onnx.load(str(base_graph), load_external_data=False)

    def location(t) -> tuple[str, int, int]:
        info = {e.key: e.value for e in t.external_data}
        return info["location"], int(info.get("offset") or 0), int(info["length"])

    base_ext = [t for t in base.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    files = {location(t)[0] for t in base_ext}
    if len(files) != 1:
        raise UserError(f"{base_graph}: its weights are not in one external-data file; export the model again")
    base_file = base_graph.parent / files.pop()
    by_name = {t.name: t for t in base_ext}
    by_digest: dict | None = None
    taken = {t.name for t in model.graph.initializer} | {i for n in model.graph.node for i in (*n.input, *n.output)}
    renames: dict[str, str] = {}
    with open(base_file, "rb") as bf, open(graph.parent / "model.onnx.data", "rb") as own:
        def read(f, t) -> bytes:
            _, offset, length = location(t)
            f.seek(offset)
            return f.read(length)

        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            if location(t)[0] != "model.onnx.data":
                raise UserError(f"{graph}: weights in {location(t)[0]}, expected model.onnx.data")
            data, key = read(own, t), (t.data_type, tuple(t.dims))
            match = by_name.get(t.name)
            if match is None or (match.data_type, tuple(match.dims)) != key or read(bf, match) != data:
                if by_digest is None:
                    by_digest = {(b.data_type, tuple(b.dims), hashlib.sha256(read(bf, b)).digest()): b for b in base_ext}
                match = by_digest.get((*key, hashlib.sha256(data).digest()))
            if match is None:
                raise UserError(f"{graph.name}: weight {t.name!r} is not in {base_file} (the engine's UNet was "
                                "exported from other weights; export it again)")
            if match.name != t.name and match.name not in taken:
                renames[t.name] = match.name
                taken.add(match.name)
                t.name = match.name
            del t.external_data[:]
            for k, v in zip(("location", "offset", "length"), location(match)):
                e = t.external_data.add()
                e.key, e.value = k, str(v)
    if renames:  # the base graph's names, so run-time weight overrides (LoRAs) find them here too
        for node in model.graph.node:
            if any(i in renames for i in node.input):
                node.input[:] = [renames.get(i, i) for i in node.input]
    onnx.save_model(model, str(out))


def add_controls(model_dir, engine_dir, controlnets: Sequence, *, force: bool, opset: int, allow_pickle: bool,
                 cpu_variants: bool, log: Callable[[str], None]) -> dict:
    """`sdrt export MODEL_DIR ENGINE_DIR --add --controlnet ...`: add ControlNets/T2I-Adapters to an engine
    directory exported from ``model_dir``, and the UNet graph they need if it lacks it; no other file is touched.
    ``force``: replace ControlNets of the same name. Returns the updated manifest.

    Written beside: the graphs into ``.ENGINE.add-PID/``, the UNet graphs as hidden ``*.part-PID`` files in
    ``unet/``; then each renamed into place and the manifest (written beside, renamed) last, so the manifest
    never names a file that is not complete. A failure before that removes what was written.
    """
    from sdrt.export.checkpoint import Checkpoint
    from sdrt.export.exporter import _control_sources, _remove_stale_temporaries, _require_torch
    from sdrt.export.graphs import graph_specs
    from sdrt.runtime.manifest import MANIFEST_NAME, Manifest, write_json_atomic

    if not controlnets:
        raise UserError("--add: name the models to add with --controlnet PATH[:NAME]")
    engine_dir = Path(engine_dir)
    manifest = Manifest.load(engine_dir, verify="size")
    data = manifest.data
    if not manifest.has("unet"):
        raise UserError(f"{engine_dir}: has no unet; a ControlNet's graph runs beside it (export the unet)")
    if Path(model_dir).is_file():
        raise UserError(f"--add {model_dir}: give the checkpoint folder (adding to an engine exported from a single "
                        "file is not supported yet; export it anew with --controlnet)")
    ckpt = Checkpoint.open(model_dir, allow_pickle=allow_pickle)
    if ckpt.config_sha256() != data.get("source", {}).get("config_sha256"):
        raise UserError(f"{engine_dir} was not exported from {model_dir} (its configs differ from those the manifest "
                        "records); give the checkpoint it was exported from")
    sources = _control_sources(controlnets, ckpt, allow_pickle)
    known = data.get(CONTROLNETS) or {}
    clash = [s.name for s in sources if s.name in known]
    if clash and not force:
        raise UserError(f"--controlnet name {clash[0]!r} is already in {engine_dir}; pass --force to replace it, or "
                        "name it apart with PATH:NAME")
    loras = _recorded_loras(data.get("source", {}).get("loras") or [])
    _require_torch()
    numbers = data["model"]
    _remove_stale_temporaries(engine_dir, log)
    stage = engine_dir.with_name(f".{engine_dir.name}.add-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    done = None
    try:
        done = export_controls(sources, stage=stage, engine=engine_dir, ckpt=ckpt, numbers=numbers,
                               unet_spec=graph_specs(numbers)["unet"], present=tuple(data.get("components", {})),
                               lora_files=loras, opset=opset, cpu_variants=cpu_variants, allow_pickle=allow_pickle,
                               log=log)
        old = stage / ".replaced"
        for folder in done.folders:
            final = engine_dir / folder
            if final.exists():  # --force: the ControlNet of that name, moved aside until the manifest is written
                (old / folder).parent.mkdir(parents=True, exist_ok=True)
                os.replace(final, old / folder)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / folder, final)
        for part, final in done.renames:
            os.replace(part, final)
        data.setdefault("components", {}).update(done.components)
        data.setdefault(CONTROLNETS, {}).update(done.records)
        write_json_atomic(engine_dir / MANIFEST_NAME, data)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        for part, _ in (done.renames if done else []):
            part.unlink(missing_ok=True)
        for stray in (engine_dir / "unet").glob(f".*.part-{os.getpid()}"):
            stray.unlink(missing_ok=True)
    added = ", ".join(list(done.components))
    log(f"added {added} to {engine_dir}; nothing else re-exported")
    return data


def _recorded_loras(records: list[dict]) -> list:
    """The LoRAs the engine's UNet was exported with (its manifest's source.loras), loaded again and checked
    unchanged, so the residual UNet graph is traced from the same weights."""
    from sdrt.runtime.lora import load_loras

    for r in records:
        path = Path(r["file"])
        if not path.is_file() or sha256_files([path])[0] != r.get("sha256"):
            raise UserError(f"{path}: the LoRA this engine was exported with is missing or changed; the residual UNet "
                            "needs the same weights (export the model anew)")
    return load_loras([(r["file"], r["scale"]) for r in records])
