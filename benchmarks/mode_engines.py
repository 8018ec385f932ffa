"""Engine directories for the quality benchmark, assembled from others without copying their weights.

* ``merge``: one engine directory whose components come from several (a plain export, the feature-caching pair
  exported on its own, a tiny VAE exported on its own), each component folder a symlink, the manifests merged.
* bf16 *emulation* for a machine without bf16 arithmetic: every MatMul, Conv and Gemm gets its operands (not
  the bias) rounded to bf16 (Cast to bfloat16 and back, round-to-nearest-even) and accumulates in fp32, which
  is what AVX512_BF16 and AMX dot products do. It runs on ONNX Runtime at fp32 speed, so it measures what bf16
  costs in accuracy, never what it gains in speed. It rounds less than OpenVINO's bf16 mode, which also keeps
  some activations between layers in bf16, so its errors are a lower bound of OpenVINO bf16's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

ROUNDED_OPS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (0, 1)}   # op -> which inputs are rounded


def emulate_bf16(model: onnx.ModelProto) -> int:
    """Round the operands of every MatMul, Gemm and Conv to bf16 in place; returns how many nodes."""
    graph = model.graph
    nodes, count = [], 0
    for node in graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in ROUNDED_OPS:
            for i in ROUNDED_OPS[node.op_type]:
                if i < len(node.input) and node.input[i]:
                    src = node.input[i]
                    low, back = f"{src}__bf16_{count}_{i}", f"{src}__bf16r_{count}_{i}"
                    nodes.append(helper.make_node("Cast", [src], [low], to=TensorProto.BFLOAT16))
                    nodes.append(helper.make_node("Cast", [low], [back], to=TensorProto.FLOAT))
                    node.input[i] = back
            count += 1
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def merge(dst: Path, sources: list[Path], bf16: tuple[str, ...] = ()) -> Path:
    """An engine directory at ``dst`` with every component of ``sources`` (the first one's manifest is the
    base; later ones add components and their ``feature_cache``), ``bf16`` components emulated."""
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    manifests = [json.loads((Path(s) / "sdrt.json").read_text()) for s in sources]
    merged = dict(manifests[0], components={})
    for src, m in zip(sources, manifests):
        for name, entry in m["components"].items():
            if name in merged["components"]:
                continue
            merged["components"][name] = entry
            folder = Path(entry["file"]).parent
            (dst / folder).symlink_to((Path(src) / folder).resolve(), target_is_directory=True)
        if "feature_cache" in m:
            merged["feature_cache"] = m["feature_cache"]
    for folder in ("tokenizer", "tokenizer_2", "scheduler"):
        if (Path(sources[0]) / folder).exists():
            (dst / folder).symlink_to((Path(sources[0]) / folder).resolve(), target_is_directory=True)
    for name in bf16:
        _emulate_component(dst, merged["components"][name])
    merged["emulation"] = {"bf16": list(bf16)} if bf16 else None
    (dst / "sdrt.json").write_text(json.dumps(merged, indent=1))
    return dst


def _emulate_component(dst: Path, entry: dict) -> None:
    """Replace the component's symlinked folder by a real one: the rewritten portable graph, the weights file
    linked; the CPU variant is dropped (ONNX Runtime then runs the rewritten graph)."""
    folder = dst / Path(entry["file"]).parent
    original = folder.resolve()
    folder.unlink()
    folder.mkdir()
    model = onnx.load(str(original / Path(entry["file"]).name), load_external_data=False)
    entry["bf16_emulated_nodes"] = emulate_bf16(model)
    graph = folder / Path(entry["file"]).name
    onnx.save_model(model, str(graph))
    files = [graph]
    if entry.get("data_file"):
        # a hard link: ONNX Runtime refuses external data reached through a symlink out of the graph's folder
        try:
            os.link(original / entry["data_file"], folder / entry["data_file"])
        except OSError:  # another file system
            shutil.copy2(original / entry["data_file"], folder / entry["data_file"])
        files.append(folder / entry["data_file"])
    entry.pop("variants", None)
    entry["size_bytes"] = sum(os.path.getsize(f) for f in files)
    entry["sha256"] = "bf16-emulation"
