"""A minimal engine directory for build/runtime tests: tiny hand-written ONNX graphs and a manifest.

Shapes follow the export contract (symbolic batch/height/width dims); the graphs are small enough for
ONNX Runtime on CPU. No torch, no diffusers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sdrt.runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, sha256_files, write_json_atomic

MODEL = {
    "latent_channels": 4, "vae_scale_factor": 2, "scaling_factor": 0.5, "shift_factor": None,
    "sample_size": 32, "default_height": 64, "default_width": 64, "size_multiple": 16, "image_channels": 3,
    "text_hidden_size": 16, "text_max_length": 8, "pad_token": "<|endoftext|>", "pad_token_id": 255,
    "prediction_type": "epsilon", "scheduler_class": "PNDMScheduler",
}


def _io(name, dtype, shape):
    elem = TensorProto.INT64 if dtype == "int64" else TensorProto.FLOAT
    return helper.make_tensor_value_info(name, elem, shape), {"name": name, "dtype": dtype, "shape": list(shape)}


def _save(graph, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _text_encoder(path: Path):
    rng = np.random.default_rng(0)
    L, H = MODEL["text_max_length"], MODEL["text_hidden_size"]
    ids, ids_s = _io("input_ids", "int64", ["batch", L])
    hs, hs_s = _io("last_hidden_state", "float32", ["batch", L, H])
    po, po_s = _io("pooler_output", "float32", ["batch", H])
    table = numpy_helper.from_array(rng.standard_normal((256, H)).astype(np.float32), "embedding")
    nodes = [helper.make_node("Gather", ["embedding", "input_ids"], ["last_hidden_state"]),
             helper.make_node("ReduceMean", ["last_hidden_state"], ["pooler_output"], axes=[1], keepdims=0)]
    _save(helper.make_graph(nodes, "text_encoder", [ids], [hs, po], [table]), path)
    return [ids_s], [hs_s, po_s]


def _unet(path: Path):
    C = MODEL["latent_channels"]
    s, s_s = _io("sample", "float32", ["batch", C, "latent_height", "latent_width"])
    t, t_s = _io("timestep", "float32", ["batch"])
    e, e_s = _io("encoder_hidden_states", "float32", ["batch", "sequence", MODEL["text_hidden_size"]])
    o, o_s = _io("out_sample", "float32", ["batch", C, "latent_height", "latent_width"])
    inits = [numpy_helper.from_array(np.array([0.5], np.float32), "half"),
             numpy_helper.from_array(np.array([1e-3], np.float32), "tscale"),
             numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "tshape")]
    nodes = [
        helper.make_node("Mul", ["timestep", "tscale"], ["t1"]),
        helper.make_node("Reshape", ["t1", "tshape"], ["t2"]),
        helper.make_node("ReduceMean", ["encoder_hidden_states"], ["c"], axes=[1, 2], keepdims=0),
        helper.make_node("Unsqueeze", ["c", "uaxes"], ["c4"]),
        helper.make_node("Mul", ["sample", "half"], ["s1"]),
        helper.make_node("Add", ["s1", "t2"], ["s2"]),
        helper.make_node("Add", ["s2", "c4"], ["out_sample"]),
    ]
    inits.append(numpy_helper.from_array(np.array([1, 2, 3], np.int64), "uaxes"))
    _save(helper.make_graph(nodes, "unet", [s, t, e], [o], inits), path)
    return [s_s, t_s, e_s], [o_s]


def _vae_decoder(path: Path):
    rng = np.random.default_rng(1)
    C, F = MODEL["latent_channels"], MODEL["vae_scale_factor"]
    z, z_s = _io("latent_sample", "float32", ["batch", C, "latent_height", "latent_width"])
    x, x_s = _io("sample", "float32", ["batch", 3, "height", "width"])
    inits = [numpy_helper.from_array(rng.standard_normal((3, C, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, 1, F, F], np.float32), "scales")]
    nodes = [helper.make_node("Conv", ["latent_sample", "w"], ["y"]),
             helper.make_node("Resize", ["y", "", "scales"], ["sample"], mode="nearest")]
    _save(helper.make_graph(nodes, "vae_decoder", [z], [x], inits), path)
    return [z_s], [x_s]


def make_engine_dir(root: Path) -> Path:
    """Write the three required components and ``sdrt.json`` under ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    components = {}
    for name, maker in (("text_encoder", _text_encoder), ("unet", _unet), ("vae_decoder", _vae_decoder)):
        rel = f"{name}/model.onnx"
        inputs, outputs = maker(root / rel)
        digest, size = sha256_files([root / rel])
        components[name] = {"file": rel, "data_file": None, "sha256": digest, "size_bytes": size,
                            "inputs": inputs, "outputs": outputs, "parity": None}
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "source": {"path": "fake"},
            "model": dict(MODEL), "components": components, "tools": {}, "engines": {}}
    write_json_atomic(root / MANIFEST_NAME, data)
    return root
