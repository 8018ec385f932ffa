"""`sdrt export`: a diffusers checkpoint -> an ONNX engine directory with a manifest, checked against PyTorch."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from sdrt import __version__
from sdrt.errors import UserError
from sdrt.export.steps import (LAYERNORM_BROADCAST_ORT, VARIANT_FILE, _checked_variants, _entry,
                               _export_unet_variants, _load_source, _release_memory, _remove_stale_temporaries,
                               _require_torch, _shapes, fuse_loras)
from sdrt.runtime.lora import check_components, load_loras
from sdrt.runtime.manifest import (COMPONENTS, FORMAT, FORMAT_VERSION, MANIFEST_NAME, sha256_files,
                                   write_json_atomic)

DEFAULT_OPSET = 17
# The graphs LoRAs patch: they get a weight map, and their weights go to the external-data file, so the runtime
# can hand onnxruntime patched values as external initializers, which every graph optimization then sees.
LORA_COMPONENTS = ("text_encoder", "text_encoder_2", "unet")


def parse_components(text: str | Sequence[str] | None, available: Sequence[str] = COMPONENTS) -> list[str]:
    """The components to export, in the manifest's order; ``available``: those the checkpoint has."""
    available = [c for c in COMPONENTS if c in available]
    if text is None:
        return available
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    bad = [n for n in names if n not in available]
    if bad or not names:
        raise UserError(f"--components {','.join(bad) or text!r}: choose from {', '.join(available)}")
    return [c for c in available if c in names]


def _tool_versions(opset: int) -> dict:
    import diffusers
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"sdrt": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "opset": opset}


def export_model(model_dir: str | os.PathLike, engine_dir: str | os.PathLike, *, force: bool = False,
                 opset: int = DEFAULT_OPSET, components: Sequence[str] | str | None = None,
                 allow_pickle: bool = False, progress: bool = True, cpu_variants: bool = True,
                 loras: Sequence = (), vae: str | os.PathLike | None = None, prediction_type: str | None = None,
                 config_dir: str | os.PathLike | None = None,
                 cache_branch: int | None = None, tiny_vae: str | os.PathLike | None = None,
                 controlnets: Sequence = (), add: bool = False,
                 log: Callable[[str], None] | None = None) -> dict:
    """Export the checkpoint at ``model_dir`` into ``engine_dir``; returns the manifest.

    ``model_dir`` is a diffusers folder or a single ``.safetensors`` file in the original layout
    (sdrt.export.single_file), which takes ``vae`` (a separate VAE file), ``prediction_type`` and
    ``config_dir`` (configs to convert with, instead of those sdrt ships for the family).

    ``loras``: LoRA files fused into the exported weights, each ``"FILE[:SCALE]"`` or ``(file, scale)``
    (sdrt.runtime.lora). The text encoder and UNet also get a weight map (``weight_map.json`` beside the
    graph: where each weight a LoRA can patch went), so LoRAs can be applied at run time without re-export.

    ``cpu_variants``: also write the graphs ONNX Runtime's CPU provider runs faster (``model.ort.onnx`` beside
    ``model.onnx``, over the same weights file): the UNet with fused attention, the VAE with GroupNorm as
    LayerNormalization (opset 17 or newer).

    ``cache_branch``: also write the UNet as the pair feature caching runs (``unet_deep``, ``unet_shallow``;
    sdrt.export.feature_cache), cut at that branch. ``tiny_vae``: an AutoencoderTiny folder (diffusers layout)
    whose decoder is written beside the full one (``vae_decoder_tiny``).

    ``controlnets``: ControlNets and T2I-Adapters, each ``"PATH[:NAME]"`` or ``(path, name)``
    (sdrt.export.controlnet): each is written as its own graph ``controlnet/NAME``, with the UNet graph that takes
    its outputs (``unet_control`` or ``unet_adapter``, over the UNet's weights file). With ``add``, they are added
    to the existing ``engine_dir`` (exported from ``model_dir``) and nothing else is exported (add_controls).

    Everything is written into a hidden directory beside ``engine_dir`` and renamed into place at the end,
    so an export that fails or is killed leaves no half-written engine directory.
    """
    from sdrt.export.checkpoint import Checkpoint
    from sdrt.export.single_file import convert_single_file, inspect_single_file

    log = log or (lambda msg: print(msg, file=sys.stderr))
    if add:
        refused = [flag for flag, value in (("--components", components), ("--lora", loras), ("--vae", vae),
                                            ("--prediction-type", prediction_type), ("--config", config_dir),
                                            ("--cache-branch", cache_branch), ("--tiny-vae", tiny_vae)) if value]
        if refused:
            raise UserError(f"--add exports only --controlnet models; {', '.join(refused)} would re-export the model "
                            "(export it anew without --add)")
        from sdrt.export.controlnet import add_controls

        return add_controls(model_dir, engine_dir, controlnets, force=force, opset=opset, allow_pickle=allow_pickle,
                            cpu_variants=cpu_variants, log=log)
    parse_components(components)  # a name no checkpoint has is refused before the checkpoint is read
    if not 14 <= opset <= 20:
        raise UserError(f"--opset {opset}: choose an opset from 14 to 20 (attention needs 14 or newer)")
    engine_dir = Path(engine_dir)
    model_path = Path(model_dir).resolve()
    if engine_dir.resolve() == model_path or engine_dir.resolve() in model_path.parents:
        raise UserError(f"ENGINE_DIR {str(engine_dir)!r} is or contains MODEL_DIR; choose another folder")
    if engine_dir.exists() and not force:
        raise UserError(f"{engine_dir} already exists; pass --force to replace it")
    single = inspect_single_file(model_dir) if Path(model_dir).is_file() else None
    if single is None:
        for flag, value in (("--vae", vae), ("--prediction-type", prediction_type), ("--config", config_dir)):
            if value is not None:
                raise UserError(f"{flag} applies to single-file checkpoints; {model_dir} is a folder (its own "
                                "configs and scheduler decide)")
        ckpt = Checkpoint.open(model_dir, allow_pickle=allow_pickle)
        available = [c for c, _ in ckpt.text_encoders] + ["unet", "vae_decoder", "vae_encoder"]
    else:  # SD1.x or SD2.x: one text encoder; SDXL: two
        available = [c for c in COMPONENTS if c != "text_encoder_2" or single.family == "sdxl"]
    comps = parse_components(components, available)
    if controlnets and "unet" not in comps:
        raise UserError("--controlnet: export the unet too (its ControlNet graph runs over the UNet's weights)")
    if cache_branch is not None and ("unet" not in comps or isinstance(cache_branch, bool)
                                     or not isinstance(cache_branch, int) or cache_branch < 0):
        raise UserError(f"--cache-branch {cache_branch!r}: must be an integer >= 0, and the UNet must be exported")
    if tiny_vae is not None and "vae_decoder" not in comps:
        raise UserError(f"--tiny-vae {str(tiny_vae)!r}: export the vae_decoder too (the tiny one goes beside it)")
    lora_files = load_loras(loras)
    check_components(lora_files, [c for c in comps if c in LORA_COMPONENTS], "this export")
    _require_torch()
    if cache_branch is not None:
        from sdrt.export.feature_cache import branch_count_from_config

        count = branch_count_from_config(ckpt.unet_config)
        if cache_branch >= count:
            raise UserError(f"--cache-branch {cache_branch}: this UNet has branches 0 to {count - 1}")
    if tiny_vae is not None:
        _check_tiny_vae(tiny_vae, ckpt.vae_config)
    from sdrt.export.control_sources import inspect_controls

    controls = [] if single is not None or not controlnets else inspect_controls(controlnets, ckpt, allow_pickle)

    import torch

    from sdrt.export.graphs import SOURCES, example_inputs, export_graph, graph_specs
    from sdrt.export.parity import compare, torch_outputs
    from sdrt.export.rewrites import split_geglu
    from sdrt.export.tokenizer import export_tokenizer

    engine_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(engine_dir, log)
    tmp = engine_dir.with_name(f".{engine_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    converted = engine_dir.with_name(f".{engine_dir.name}.source-{os.getpid()}")
    try:
        single_record = None
        if single is not None:  # converted by diffusers into a diffusers folder beside the target, exported from there
            single_record = convert_single_file(single, converted, vae=vae, prediction_type=prediction_type,
                                                config_dir=config_dir, log=log)
            ckpt = Checkpoint.open(converted)
            controls = inspect_controls(controlnets, ckpt, allow_pickle)
        toks = {name: export_tokenizer(ckpt.path, tmp / name, name) for _, name in ckpt.text_encoders}
        numbers = ckpt.model_numbers(toks)
        (tmp / "scheduler").mkdir()
        shutil.copy2(ckpt.path / "scheduler" / "scheduler_config.json", tmp / "scheduler" / "scheduler_config.json")
        specs = graph_specs(numbers)
        trace_shape, check_shape = _shapes(numbers, ckpt.latent_size_multiple)
        vocab = int(ckpt.text_config.get("vocab_size", 49408))
        entries: dict[str, dict] = {}
        loaded: dict[str, torch.nn.Module] = {}
        bar = _progress(comps, progress)
        for i, comp in enumerate(bar):
            t0 = time.perf_counter()
            source = SOURCES[comp]
            if source not in loaded:
                loaded.clear()
                _release_memory()
                loaded[source] = _load_source(ckpt, source, allow_pickle)
                fuse_loras(loaded[source], source, lora_files)
            spec = specs[comp]
            module = spec.wrap(loaded).eval()
            check_inputs = example_inputs(spec, numbers, *check_shape, vocab, seed=1)
            outputs = [n for n, _, _ in spec.outputs]
            _set_postfix(bar, comp, "reference")
            expected = torch_outputs(module, check_inputs)
            variants = {}
            _set_postfix(bar, comp, "tracing")
            trace_inputs = example_inputs(spec, numbers, *trace_shape, vocab, seed=0)
            if comp == "unet":
                with split_geglu(loaded["unet"]):
                    if cpu_variants:
                        graph, data_file, variants = _export_unet_variants(
                            spec, module, loaded["unet"], trace_inputs, tmp / comp, opset)
                    else:
                        graph, data_file = export_graph(spec, module, trace_inputs, tmp / comp, opset, external=True)
            elif comp.startswith("vae_") and cpu_variants and opset >= 17:
                graph, data_file, variants = _export_vae_variants(spec, module, trace_inputs, tmp / comp, opset)
            else:
                graph, data_file = export_graph(spec, module, trace_inputs, tmp / comp, opset,
                                                external=comp in LORA_COMPONENTS)
            extra = {"token_embedding": token_embedding_record(graph, module)} if comp == "text_encoder" else {}
            if comp in LORA_COMPONENTS:  # while PyTorch's weights are at hand
                extra["weight_map"] = _write_weight_map(loaded[source], graph, [p for p, _ in variants.values()],
                                                        getattr(module, "unused_weights", set)())
            pair = {}
            if comp == "unet" and cache_branch is not None:
                _set_postfix(bar, "unet", f"feature-cache pair at branch {cache_branch}")
                pair = _export_feature_cache(spec, loaded["unet"], cache_branch, trace_inputs, check_inputs, tmp,
                                             opset, cpu_variants, log)
            del module, trace_inputs
            if source not in (SOURCES[c] for c in comps[i + 1:]):
                # PyTorch's outputs are in hand: free its weights before ONNX Runtime loads the graph's, so
                # the two never share memory
                loaded.clear()
                _release_memory()
            _set_postfix(bar, comp, "parity")
            parity = compare(comp, graph, expected, check_inputs, outputs)
            variants = _checked_variants(comp, variants, data_file, expected, check_inputs, outputs)
            entries[comp] = _entry(comp, spec, graph, data_file, parity, variants, t0, log, **extra)
            entries.update(pair)
            if comp == "vae_decoder" and tiny_vae is not None:
                loaded.clear()
                _release_memory()
                entries.update(_export_tiny_vae(tiny_vae, spec, numbers, trace_shape, check_shape, vocab, tmp,
                                                opset, allow_pickle, log))
        loaded.clear()
        records = {}
        if controls:
            from sdrt.export.controlnet import export_controls

            _release_memory()
            done = export_controls(controls, stage=tmp, engine=tmp, ckpt=ckpt, numbers=numbers, unet_spec=specs["unet"],
                                   present=(), lora_files=lora_files, opset=opset, cpu_variants=cpu_variants,
                                   allow_pickle=allow_pickle, log=log)
            for part, final in done.renames:
                os.replace(part, final)
            entries.update(done.components)
            records = done.records
        source = {"path": str(model_path if single is not None else ckpt.path.resolve()),
                  "pipeline_class": ckpt.model_index.get("_class_name"),
                  "config_sha256": ckpt.config_sha256(), "loras": _lora_records(lora_files)}
        if single_record is not None:
            source["single_file"] = single_record
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "source": source,
            "model": numbers, **toks, "components": entries, "tools": _tool_versions(opset),
            "engines": {},
        }
        if cache_branch is not None:
            from sdrt.export.feature_cache import DEEP, FEATURE, SHALLOW

            manifest["feature_cache"] = {"branch": cache_branch, "deep": DEEP, "shallow": SHALLOW, "feature": FEATURE}
        if records:
            from sdrt.runtime.control import CONTROLNETS

            manifest[CONTROLNETS] = records
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
        _replace_dir(tmp, engine_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(converted, ignore_errors=True)
    return manifest


def _export_feature_cache(unet_spec, unet, branch: int, trace_inputs, check_inputs, out: Path, opset: int,
                          cpu_variants: bool, log: Callable[[str], None]) -> dict:
    """``unet_deep`` and ``unet_shallow`` (sdrt.export.feature_cache), each checked against PyTorch like the
    UNet; the shallow one on the feature the deep PyTorch module computed from the same inputs."""
    import torch

    from sdrt.export.feature_cache import DEEP, FEATURE, SHALLOW, DeepUNetGraph, ShallowUNetGraph
    from sdrt.export.graphs import GraphSpec, export_graph
    from sdrt.export.parity import compare, torch_outputs
    from sdrt.export.rewrites import split_geglu

    extra = tuple(n for n, _, _ in unet_spec.inputs[3:])
    deep = DeepUNetGraph(unet, branch, extra).eval()
    shallow = ShallowUNetGraph(unet, branch, extra).eval()
    with torch.no_grad():
        channels = int(deep(*trace_inputs.values())[1].shape[1])
    feature = (FEATURE, "float32", ("batch", channels, "feature_height", "feature_width"))
    specs = {DEEP: GraphSpec(DEEP, lambda m: deep, unet_spec.inputs, unet_spec.outputs + (feature,)),
             SHALLOW: GraphSpec(SHALLOW, lambda m: shallow, unet_spec.inputs + (feature,), unet_spec.outputs)}
    entries = {}
    with split_geglu(unet):
        for comp, module in ((DEEP, deep), (SHALLOW, shallow)):
            t0 = time.perf_counter()
            spec = specs[comp]
            trace, check = dict(trace_inputs), dict(check_inputs)
            if comp == SHALLOW:
                with torch.no_grad():
                    trace[FEATURE] = deep(*trace_inputs.values())[1]
                    check[FEATURE] = deep(*check_inputs.values())[1]
            names = [n for n, _, _ in spec.outputs]
            expected = torch_outputs(module, check)
            if cpu_variants:
                graph, data_file, variants = _export_unet_variants(spec, module, unet, trace, out / comp, opset)
            else:
                (graph, data_file), variants = export_graph(spec, module, trace, out / comp, opset), {}
            parity = compare(comp, graph, expected, check, names)
            variants = _checked_variants(comp, variants, data_file, expected, check, names)
            entries[comp] = _entry(comp, spec, graph, data_file, parity, variants, t0, log, branch=branch)
    return entries


def _export_tiny_vae(folder, vae_spec, numbers: dict, trace_shape, check_shape, vocab: int, out: Path,
                     opset: int, allow_pickle: bool, log: Callable[[str], None]) -> dict:
    """``vae_decoder_tiny``: an AutoencoderTiny's decoder (latent_sample -> sample in [-1, 1]), checked against
    PyTorch; its own scaling and shift factors go into its entry (the runtime divides by them)."""
    from diffusers import AutoencoderTiny

    from sdrt.export.graphs import VaeDecoderGraph, example_inputs, export_graph
    from sdrt.export.parity import check_parity
    from sdrt.runtime.manifest import TINY_VAE

    t0 = time.perf_counter()
    path = Path(folder)
    try:
        tiny = AutoencoderTiny.from_pretrained(path, use_safetensors=None if allow_pickle else True).eval()
    except (OSError, ValueError, EnvironmentError) as e:
        raise UserError(f"--tiny-vae {str(folder)!r}: could not load its weights ({str(e).splitlines()[0]})") from None
    cfg = tiny.config
    module = VaeDecoderGraph(tiny).eval()
    trace = example_inputs(vae_spec, numbers, *trace_shape, vocab, seed=0)
    check = example_inputs(vae_spec, numbers, *check_shape, vocab, seed=1)
    graph, data_file = export_graph(vae_spec, module, trace, out / TINY_VAE, opset)
    parity = check_parity(TINY_VAE, graph, module, check, [n for n, _, _ in vae_spec.outputs])
    entry = _entry(TINY_VAE, vae_spec, graph, data_file, parity, {}, t0, log,
                   scaling_factor=float(cfg.scaling_factor), shift_factor=float(cfg.shift_factor or 0.0),
                   source=str(path.resolve()))
    return {TINY_VAE: entry}


def _check_tiny_vae(folder, vae_config: dict) -> None:
    """An AutoencoderTiny folder whose decoder fits the model: latent channels, scale factor, image channels."""
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--tiny-vae {str(folder)!r}: not a diffusers model folder ({e})") from None
    if cfg.get("_class_name") != "AutoencoderTiny":
        raise UserError(f"--tiny-vae {str(folder)!r}: its config names {cfg.get('_class_name')!r}; expected AutoencoderTiny")
    got = (cfg.get("latent_channels", 4),
           cfg.get("upsampling_scaling_factor", 2) ** (len(cfg.get("decoder_block_out_channels", [64] * 4)) - 1),
           cfg.get("out_channels", 3))
    want = (vae_config.get("latent_channels", 4), 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1),
            vae_config.get("out_channels", 3))
    if got != want:
        raise UserError(f"--tiny-vae {str(folder)!r}: it decodes {got[0]} latent channels x{got[1]} to {got[2]} "
                        f"channels; this model needs {want[0]} x{want[1]} to {want[2]}")


def token_embedding_record(graph: Path, module) -> dict:
    """Which initializer of the text encoder's graph is its token-embedding table (the runtime adds
    textual-inversion rows to it), checked against the PyTorch weight it was traced from."""
    import numpy as np

    from sdrt.runtime.onnx_weights import graph_initializers

    weight = module.text_encoder.get_input_embeddings().weight
    name = next((n for n, p in module.named_parameters() if p is weight), "")
    found = graph_initializers(graph).get(name)
    if found is None or not np.array_equal(found.read(), weight.detach().numpy()):
        raise UserError(f"{graph}: the token-embedding table {name!r} is not an initializer of the traced graph")
    return {"initializer": name, "shape": list(found.shape)}


def _lora_records(loras) -> list[dict]:
    return [{"file": str(lora.path.resolve()), "sha256": sha256_files([lora.path])[0], "scale": scale,
             "format": lora.format} for lora, scale in loras]


def _write_weight_map(model, graph: Path, variants: list[Path], unused: set[str] = frozenset()) -> dict:
    """Write ``weight_map.json`` beside ``graph``; returns the manifest's entry for it."""
    from sdrt.export.weight_map import WEIGHT_MAP_FILE, build_weight_map, summary

    record = build_weight_map(model, graph, tuple(variants), unused)
    path = graph.parent / WEIGHT_MAP_FILE
    write_json_atomic(path, record)
    return {"file": f"{graph.parent.name}/{WEIGHT_MAP_FILE}", "sha256": sha256_files([path])[0], **summary(record)}


def _export_vae_variants(spec, module, trace_inputs, out_dir: Path, opset: int):
    """A VAE graph twice over one weights file: the portable ``model.onnx`` as traced, and ``model.ort.onnx``
    with each GroupNorm as one LayerNormalization (the CPU backend's graph); a graph without a GroupNorm to
    rewrite gets no variant. Returns the portable graph, the data file and the variants to check, as
    ``_export_unet_variants``."""
    import onnx

    from sdrt.export.graphs import export_graph
    from sdrt.export.rewrites import groupnorm_as_layernorm

    plain, data_file = export_graph(spec, module, trace_inputs, out_dir, opset, external=True)
    model = onnx.load(str(plain), load_external_data=False)
    count = groupnorm_as_layernorm(model)
    if not count:
        return plain, data_file, {}
    variant = out_dir / VARIANT_FILE
    onnx.save_model(model, str(variant))
    del model
    return plain, data_file, {"cpu": (variant, {"described": "GroupNorm as LayerNormalization",
                                                "groupnorm": "LayerNormalization", "groupnorms": count,
                                                "min_onnxruntime": LAYERNORM_BROADCAST_ORT})}


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` into place; an existing ``target`` (allowed by --force) is moved aside first."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)  # put the previous engine directory back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="export", unit="graph", file=sys.stderr, leave=False)


def _set_postfix(bar, comp: str, what: str) -> None:
    if hasattr(bar, "set_postfix_str"):
        bar.set_postfix_str(f"{comp}: {what}")
