"""Graph forms that ONNX Runtime's CPU provider runs faster, each computing exactly what diffusers computes.

Both were found by profiling the full-size SD1.5 architecture on 2 cores (``benchmarks/cpu_graphs.py``
measures them; ``benchmarks/RESULTS.md`` has the figures). The parity gate checks every graph they produce.

- **GEGLU with its projection split in two** (torch level, every UNet graph). diffusers projects to twice the
  feed-forward width and chunks the result; the exported graph then slices a [batch, 4096, 2560] tensor
  twice per block at 512 px. Two matrix products over the two halves of the weight give the same numbers
  without the copies.
- **GroupNorm as one LayerNormalization** (ONNX level, the VAE's CPU variant). The exporter spells GroupNorm
  as Reshape -> InstanceNormalization -> Reshape -> Mul(gamma) -> Add(beta): five passes over tensors of up
  to 256x512x512 floats in the VAE decoder, and ONNX Runtime's InstanceNormalization accumulates in float.
  ``LayerNormalization(axis=2)`` over x viewed as [N, groups, C/groups, H*W], with gamma and beta viewed as
  [groups, C/groups, 1] (unidirectional broadcasting, as the ONNX spec allows), does the normalization and
  the affine in one kernel. ONNX Runtime supports that broadcast from 1.24 on; TensorRT and OpenVINO keep
  reading the portable graph, so only the CPU variant uses it.

And one form for memory, not speed:

- **Linear weights stored transposed while tracing** (torch level, every graph). The exporter writes a Linear
  over 3-D tokens as MatMul(x, Transpose(W)) and constant-folds the Transpose into a new tensor, while the
  model still holds W: every such weight is in memory twice until the export ends. The full-size SDXL UNet
  has 8.3 of its 9.6 GiB in Linears; its export peaked at 17.6 GiB before this, 11.7 GiB after (with the
  weights read unmapped: sdrt.export.unmapped).
  ``linear_as_matmul`` keeps each weight as W^T (one tensor at a time, so memory never grows by more than
  one weight) and runs the MatMul and Add the exporter would have written, with nothing left to fold.
"""

from __future__ import annotations

import contextlib
import types

import torch


def _split_geglu_forward(self, hidden_states, *args, **kwargs):
    proj = self.proj
    b = proj.bias
    half = proj.value_t.shape[1]  # chunk(2, dim=-1) order: the first half is the value, the second the gate
    value = torch.matmul(hidden_states, proj.value_t)
    gate = torch.matmul(hidden_states, proj.gate_t)
    if b is not None:
        value, gate = value + b[:half], gate + b[half:]
    return value * self.gelu(gate)


def _param(value: torch.Tensor, like: torch.nn.Parameter) -> torch.nn.Parameter:
    return torch.nn.Parameter(value, requires_grad=like.requires_grad)


@contextlib.contextmanager
def split_geglu(model: torch.nn.Module):
    """Within the block, every diffusers ``GEGLU`` of ``model`` runs as two matrix products over the two halves
    of its projection, each stored transposed (``proj.value_t``, ``proj.gate_t``: what the exported MatMuls
    read, so the exporter folds no copy of them); yields how many. The weights are put back as they were."""
    from diffusers.models.activations import GEGLU

    patched = []
    try:
        with torch.no_grad():
            for m in model.modules():
                if type(m) is not GEGLU or "weight" not in m.proj._parameters:
                    continue
                w = m.proj._parameters.pop("weight")
                half = w.shape[0] // 2
                m.proj.register_parameter("value_t", _param(w[:half].t().contiguous(), w))
                m.proj.register_parameter("gate_t", _param(w[half:].t().contiguous(), w))
                patched.append((m, w.requires_grad))
                del w
                m.forward = types.MethodType(_split_geglu_forward, m)
        yield len(patched)
    finally:
        with torch.no_grad():
            for m, grad in patched:
                del m.forward  # back to the class's forward
                value, gate = m.proj._parameters.pop("value_t"), m.proj._parameters.pop("gate_t")
                m.proj.register_parameter("weight", torch.nn.Parameter(
                    torch.cat([value.t(), gate.t()]), requires_grad=grad))
                del value, gate


def _matmul_forward(self, x):
    y = torch.matmul(x, self.weight_t)
    return y if self.bias is None else y + self.bias


@contextlib.contextmanager
def linear_as_matmul(model: torch.nn.Module):
    """Within the block, every ``torch.nn.Linear`` of ``model`` holds its weight transposed (``weight_t``) and
    runs ``x @ weight_t + bias``; yields how many. ``.weight`` still reads as the (transposed view of the)
    weight for code that asks its shape or dtype. A weight shared by several Linears stays shared. On exit
    each weight is a parameter of its original layout again, with the same values.

    Linears already rewritten (a split GEGLU's projection) are left alone."""
    groups: dict[int, list] = {}  # the Linears of each weight, found while every weight is alive
    for m in model.modules():
        if type(m) is torch.nn.Linear and "weight" in m._parameters:
            groups.setdefault(id(m._parameters["weight"]), []).append(m)
    patched = []
    try:
        with torch.no_grad():
            for mods in groups.values():
                w = mods[0]._parameters["weight"]
                wt = _param(w.t().contiguous(), w)
                for m in mods:
                    del m._parameters["weight"]
                    m.register_parameter("weight_t", wt)
                    m.__dict__["weight"] = wt.t()
                    m.forward = types.MethodType(_matmul_forward, m)
                patched.append((mods, w.requires_grad))
                del w, wt  # the original is freed here, before the next one is copied
        yield sum(len(mods) for mods, _ in patched)
    finally:
        with torch.no_grad():
            for mods, grad in patched:
                wt = mods[0]._parameters["weight_t"]
                w = torch.nn.Parameter(wt.t().contiguous(), requires_grad=grad)
                for m in mods:
                    del m.forward, m.__dict__["weight"], m._parameters["weight_t"]
                    m.register_parameter("weight", w)
                del w, wt


def groupnorm_as_layernorm(model) -> int:
    """Rewrite each exported GroupNorm of an ONNX ModelProto into one LayerNormalization; returns how many.

    Matches Reshape(x, [0, G, -1]) -> InstanceNormalization(scale 1, bias 0) -> Reshape(to x's shape) ->
    Mul(gamma [C,1,..]) -> Add(beta [C,1,..]), where no intermediate value is used elsewhere. Initializers are
    not touched (an external-data file can be shared with the graph this one came from): gamma and beta are
    reshaped by nodes that ONNX Runtime folds at load. Needs opset 17 or newer.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    nodes = list(graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}

    def tensor(name):
        """The TensorProto behind a constant value (initializer, Constant node, or Identity of one), or None."""
        if name in inits:
            return inits[name]
        p = producer.get(name)
        if p is not None and p.op_type == "Identity":  # the exporter's way of sharing one initializer
            return tensor(p.input[0])
        if p is not None and p.op_type == "Constant" and p.attribute and p.attribute[0].name == "value":
            return p.attribute[0].t
        return None

    def constant(name):
        """Its value, when stored in the graph (weights in an external-data file are not read)."""
        t = tensor(name)
        if t is None or t.data_location == TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(t)

    def dims(name):
        t = tensor(name)
        return None if t is None else tuple(t.dims)

    def only_consumer(value, op_type):
        c = consumers.get(value, [])
        if len(c) == 1 and c[0].op_type == op_type and value not in graph_outputs:
            return c[0]
        return None

    replace: dict[int, list] = {}
    drop: set[int] = set()
    for n in nodes:
        if n.op_type != "InstanceNormalization":
            continue
        front = producer.get(n.input[0])
        if front is None or front.op_type != "Reshape" or only_consumer(front.output[0], "InstanceNormalization") is None:
            continue
        shape = constant(front.input[1])
        scale, bias = constant(n.input[1]), constant(n.input[2])
        if (shape is None or shape.shape != (3,) or shape[0] != 0 or shape[2] != -1 or scale is None or bias is None
                or not (np.all(scale == 1) and np.all(bias == 0))):
            continue
        back = only_consumer(n.output[0], "Reshape")
        mul = back and only_consumer(back.output[0], "Mul")
        add = mul and only_consumer(mul.output[0], "Add")
        if add is None:
            continue
        gamma = next(i for i in mul.input if i != back.output[0])
        beta = next(i for i in add.input if i != mul.output[0])
        g, b = dims(gamma), dims(beta)
        groups = int(shape[1])
        # gamma [C, 1, ..., 1]: per channel of x [N, C, ...] (4-D in ResNets, 3-D in the VAE's attention)
        if g is None or b != g or len(g) < 2 or any(d != 1 for d in g[1:]):
            continue
        channels = g[0]
        if groups <= 0 or channels % groups:
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        p = f"{n.name or 'InstanceNormalization'}_as_layernorm"

        def const(name, values):
            return helper.make_node("Constant", [], [name],
                                    value=numpy_helper.from_array(np.array(values, np.int64), name + "_value"))

        replace[id(add)] = [
            const(f"{p}_x_shape", [0, groups, channels // groups, -1]),
            const(f"{p}_affine_shape", [groups, channels // groups, 1]),
            helper.make_node("Reshape", [front.input[0], f"{p}_x_shape"], [f"{p}_x"]),
            helper.make_node("Reshape", [gamma, f"{p}_affine_shape"], [f"{p}_gamma"]),
            helper.make_node("Reshape", [beta, f"{p}_affine_shape"], [f"{p}_beta"]),
            helper.make_node("LayerNormalization", [f"{p}_x", f"{p}_gamma", f"{p}_beta"], [f"{p}_y"],
                             name=p, axis=2, epsilon=eps),
            helper.make_node("Reshape", [f"{p}_y", back.input[1]], [add.output[0]]),
        ]
        drop.update({id(front), id(n), id(back), id(mul)})
    if not replace:
        return 0
    rewritten = []
    for n in nodes:
        if id(n) in replace:
            rewritten.extend(replace[id(n)])
        elif id(n) not in drop:
            rewritten.append(n)
    del graph.node[:]
    graph.node.extend(prune(rewritten, graph_outputs))
    return len(replace)


def prune(nodes: list, outputs: set[str]) -> list:
    """``nodes`` (in topological order) without those no graph output depends on."""
    needed = set(outputs)
    kept = []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(n.input)
    return kept[::-1]
