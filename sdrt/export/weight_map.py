"""The record of where each weight a LoRA can patch went in an exported graph, written beside the graph.

The exporter renames and reshapes weights: a Linear's weight becomes ``onnx::MatMul_123`` holding W
transposed, GEGLU's projection becomes two initializers (its halves, transposed: sdrt.export.rewrites), a conv
keeps its name. Rather than guess from node names, the export looks each weight up by value: every float
initializer of the graph is hashed, then each Linear/Conv2d weight of the torch model is looked for as is,
transposed, and as halves along its output axis. The result, ``<component>/weight_map.json``::

    {"format": "sdrt-weight-map", "format_version": 1, "graphs": ["model.onnx", "model.ort.onnx"],
     "weights": {"<module path>.weight": {"shape": [out, in(, kh, kw)],        # the torch weight
                                           "initializers": [{"name": str, "transpose": bool,
                                                             "rows": [start, stop]?}]},   # a slice of the rows
                 "<module path>.weight": {"shape": [...], "unmapped": "why"}}}

Module paths are those of the diffusers/transformers model (``down_blocks.0.attentions.0...to_q.weight``,
``text_model.encoder.layers.0.self_attn.q_proj.weight``): the names LoRA files use. A weight whose value is
found in no initializer, or in several, or that shares its initializer with another weight (the exporter
de-duplicates equal tensors) is recorded as unmapped, and the runtime refuses a LoRA that patches it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from sdrt.runtime.onnx_weights import graph_initializers

WEIGHT_MAP_FILE = "weight_map.json"
FORMAT = "sdrt-weight-map"
FORMAT_VERSION = 1


def patchable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``<module path>.weight`` -> weight, for every Linear and Conv2d of ``model`` (what LoRAs patch)."""
    return {f"{name}.weight": m.weight for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight is not None}


def _digest(array: np.ndarray) -> bytes:
    a = np.ascontiguousarray(array)
    return hashlib.blake2b(repr(a.shape).encode() + a.tobytes(), digest_size=16).digest()


def _forms(weight: np.ndarray):
    """(placement, value) pairs the exporter may have stored ``weight`` as, most likely first."""
    yield {}, weight
    if weight.ndim == 4 and weight.shape[2:] == (1, 1):  # a 1x1 conv run as a matrix product
        weight = weight.reshape(weight.shape[:2])
        yield {}, weight
    if weight.ndim == 2:
        yield {"transpose": True}, weight.T


def _halves(weight: np.ndarray):
    """The two row halves of a 2-D weight (GEGLU's value and gate), each as is or transposed."""
    if weight.ndim != 2 or weight.shape[0] % 2:
        return
    half = weight.shape[0] // 2
    for transpose in (True, False):
        parts = []
        for rows in ((0, half), (half, 2 * half)):
            part = weight[rows[0]:rows[1]]
            parts.append(({"transpose": True, "rows": list(rows)} if transpose else {"rows": list(rows)},
                          part.T if transpose else part))
        yield parts


def build_weight_map(model: torch.nn.Module, graph: Path, variants: tuple[Path, ...] = (),
                     unused: set[str] = frozenset()) -> dict:
    """Locate every patchable weight of ``model`` among the initializers of ``graph`` (and check that each
    graph of ``variants``, which shares its weights, names them alike). ``unused``: weights the traced graph
    does not read (SDXL's first text encoder's last layer), recorded as such: a LoRA on them changes nothing."""
    inits = graph_initializers(graph)
    index: dict[bytes, list[str]] = {}
    for name, init in inits.items():
        if init.dtype == "float32" and len(init.shape) in (2, 4) and init.file is not None:
            index.setdefault(_digest(init.read()), []).append(name)

    def lookup(value: np.ndarray) -> list[str]:
        return index.get(_digest(value), [])

    weights: dict[str, dict] = {}
    for wname, param in patchable_weights(model).items():
        w = param.detach().cpu().numpy()
        entry: dict = {"shape": list(w.shape)}
        if wname in unused:
            entry["unused"] = "the graph does not read it"
            weights[wname] = entry
            continue
        places = None
        for how, value in _forms(w):
            names = lookup(value)
            if names:
                places = "ambiguous" if len(names) > 1 else [{"name": names[0], "transpose": "transpose" in how}]
                break
        if places is None:
            for parts in _halves(w):
                found = [lookup(value) for _, value in parts]
                if all(len(f) == 1 for f in found):
                    places = [{"name": f[0], "transpose": how.get("transpose", False), "rows": how["rows"]}
                              for (how, _), f in zip(parts, found)]
                    break
        if places is None:
            entry["unmapped"] = "its value is not an initializer of the graph (folded into another)"
        elif places == "ambiguous":
            entry["unmapped"] = "several initializers hold its value"
        else:
            entry["initializers"] = places
        weights[wname] = entry
    _mark_shared(weights)
    for variant in variants:
        other = graph_initializers(variant)
        for entry in weights.values():
            for place in entry.get("initializers", ()):
                a, b = inits[place["name"]], other.get(place["name"])
                same_bytes = b is not None and (a.file, a.offset) == (b.file, b.offset)  # a shared data file
                if b is None or a.shape != b.shape or not (same_bytes or np.array_equal(a.read(), b.read())):
                    raise RuntimeError(f"{variant}: initializer {place['name']!r} is not the one of {graph}")
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "graphs": [graph.name] + [v.name for v in variants], "weights": weights}


def _mark_shared(weights: dict[str, dict]) -> None:
    """A weight whose initializer another weight also uses (equal tensors are stored once) is unmapped."""
    users: dict[str, list[str]] = {}
    for wname, entry in weights.items():
        for place in entry.get("initializers", ()):
            users.setdefault(place["name"], []).append(wname)
    for name, ws in users.items():
        if len(ws) > 1:
            for w in ws:
                weights[w].pop("initializers", None)
                weights[w]["unmapped"] = f"its initializer {name!r} also holds {', '.join(x for x in ws if x != w)}"


def summary(weight_map: dict) -> dict:
    """What the manifest says of a weight map: its file and how many weights it locates."""
    ws = weight_map["weights"].values()
    return {"mapped": sum("initializers" in e for e in ws), "unmapped": sum("unmapped" in e for e in ws),
            "unused": sum("unused" in e for e in ws)}
