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
UNet's and the file's conditioning embedding. A T2I-Adapter is a diffusers ``T2IAdapter`` folder. What each
argument is and whether it fits: sdrt.export.control_sources; the weights sharing: sdrt.export.shared_weights.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from sdrt.errors import UserError
from sdrt.export.control_sources import ControlSource, adapter_features, fit_record, load_control, unet_adapter_slots
from sdrt.export.shared_weights import share_weights
from sdrt.export.steps import _checked_variants
from sdrt.runtime.control import (CONTROL_IMAGE, CONTROLNET, CONTROLNETS, MID_RESIDUAL, T2I_ADAPTER, UNET_ADAPTER,
                                  UNET_CONTROL, adapter_feature, down_residual, level_dims, level_size)
from sdrt.runtime.manifest import sha256_files

UNET_GRAPH_FILES = {UNET_CONTROL: "control", UNET_ADAPTER: "adapter"}  # unet/<stem>.onnx and <stem>.ort.onnx


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
                more = {"down_block_additional_residuals": residuals[:-1],
                        "mid_block_additional_residual": residuals[-1]}
            else:  # diffusers adds them in place, popping the list: hand it copies
                more = {"down_intrablock_additional_residuals": [r.clone() for r in residuals]}
            return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=kw.get("timestep_cond"),
                             added_cond_kwargs=_added(self.extra, extra), return_dict=False, **more)[0]

    return ControlNetGraph, AdapterGraph, UNetResidualGraph


def _levels(shapes: list[tuple[int, ...]], latent: tuple[int, int]) -> list[int]:
    """Each output's downsampling level: k where its size is the latent size halved k times, rounding up."""
    out = []
    for s in shapes:
        k = next((k for k in range(16) if s[2:] == tuple(level_size(v, k) for v in latent)), None)
        if k is None:
            raise UserError(f"an output of size {s[2:]} is no halving of the latent size {latent}")
        out.append(k)
    return out


def _symbolic(name: str, shape, level: int) -> tuple:
    return name, "float32", ("batch", int(shape[1]), *level_dims(level))


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

    from sdrt.export.steps import _entry, _release_memory, _shapes
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
            count = _features_read(ckpt.unet_config, model.config, numbers["vae_scale_factor"])
            module = AdapterGraph(model, count).eval()
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
        variants = _checked_variants(src.component, variants, data_file, expected, check_in, out_names)
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


def _fit_shape(shape: tuple, ratio: int, multiple: int) -> tuple:
    """(batch, latent_h, latent_w, chunks) with each latent side made a multiple of ``ratio`` and, where it was
    not a multiple of the UNet's downsampling ``multiple``, kept off one if ``ratio`` allows (steps._shapes:
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
    from sdrt.export.steps import _export_unet_variants
    from sdrt.export.graphs import export_graph
    from sdrt.export.rewrites import split_geglu

    has_attention = bool(getattr(model, "attn_processors", None))
    with split_geglu(model):
        if cpu_variants and has_attention:
            return _export_unet_variants(spec, module, model, trace_in, folder, opset)
        graph, data_file = export_graph(spec, module, trace_in, folder, opset)
        return graph, data_file, {}


def _export_unet_graph(comp, UNetResidualGraph, ckpt, numbers, unet_spec, res_specs, trace_res, check_res,
                       trace_shape, check_shape, vocab, engine: Path, lora_files, opset, cpu_variants, allow_pickle,
                       log):
    """``unet_control`` or ``unet_adapter``: traced in a scratch folder, its weights pointed into the engine UNet's
    weights file (share_weights), checked against PyTorch there, as ``unet/.<stem>*.part-PID``."""
    from sdrt.export.steps import _entry, _load_source, _release_memory, fuse_loras, log_entry
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
    variants = _checked_variants(comp, variants, "model.onnx.data", expected, check, names)
    entry = _entry(comp, spec, graph_part, "model.onnx.data", parity, variants, t0, None,
                   base=fit_record(ckpt.unet_config))
    # the manifest names the files they will have once renamed into place
    entry["file"] = f"unet/{stem}.onnx"
    for v in entry.get("variants", {}).values():
        v["file"] = f"unet/{stem}.ort.onnx"
    log_entry(comp, entry, log)
    final = {p: unet_dir / (f"{stem}.onnx" if p == graph else f"{stem}.ort.onnx") for p in parts}
    return entry, [(part, final[p]) for p, part in parts.items()]


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
    from sdrt.export.control_sources import inspect_controls
    from sdrt.export.steps import _remove_stale_temporaries, _require_torch
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
    sources = inspect_controls(controlnets, ckpt, allow_pickle)
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
