"""Attention exported as one ONNX Runtime ``com.microsoft.MultiHeadAttention`` node.

The plain export spells attention as MatMul -> Softmax -> MatMul over a (batch*heads, tokens, tokens)
matrix: at 512 px the UNet's first level has 4096 tokens, so each self-attention writes and reads a 1 GiB
float32 matrix. ONNX Runtime's CPU MultiHeadAttention kernel computes the same thing in tiles. Its own
UNet fusion pass (onnxruntime.transformers, model_type "unet") crashes on our graphs, so the export emits
the fused node directly: an autograd Function whose ``symbolic`` is the contrib op and whose ``forward`` is
exactly diffusers' computation, so tracing and the parity gate see the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONTRIB_DOMAIN = "com.microsoft"


class _MultiHeadAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, heads: int):
        b, _, inner = query.shape
        d = inner // heads
        q = query.view(b, -1, heads, d).transpose(1, 2)
        k = key.view(b, -1, heads, d).transpose(1, 2)
        v = value.view(b, -1, heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(d), as diffusers' AttnProcessor2_0
        return out.transpose(1, 2).reshape(b, -1, inner)

    @staticmethod
    def symbolic(g, query, key, value, heads: int):
        out = g.op(f"{CONTRIB_DOMAIN}::MultiHeadAttention", query, key, value, num_heads_i=heads)
        out.setType(query.type())  # the output has the query's shape and dtype (tells shape inference)
        return out


class FusedAttnProcessor:
    """diffusers' AttnProcessor2_0 for the UNet's transformer blocks (3-D tokens, no mask, no norms)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        out = _MultiHeadAttention.apply(query, key, value, attn.heads)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def supports(attn) -> bool:
    """Whether a diffusers Attention module is of the plain kind FusedAttnProcessor reproduces exactly."""
    return (attn.spatial_norm is None and attn.group_norm is None and getattr(attn, "norm_q", None) is None
            and getattr(attn, "norm_k", None) is None and not getattr(attn, "is_cross_attention_norm", False)
            and type(attn.processor).__name__ in ("AttnProcessor2_0", "AttnProcessor"))


def fuse_attention(model: torch.nn.Module) -> int:
    """Give every plain attention module of ``model`` the fused processor; returns how many."""
    from diffusers.models.attention_processor import Attention

    n = 0
    for module in model.modules():
        if isinstance(module, Attention) and supports(module):
            module.set_processor(FusedAttnProcessor())
            n += 1
    return n


def expand_attention(model) -> int:
    """Rewrite every ``com.microsoft.MultiHeadAttention`` node of an ONNX ModelProto into standard ops.

    The portable graph (TensorRT, OpenVINO, other ONNX Runtime providers) is made from the fused one, so
    both share one set of weights: initializers are not touched (external-data references stay as they
    are), and the rewrite adds only small shape constants. Per node, with q [B, Sq, H*D], k and v [B, Sk, H*D]:
    ``softmax((q_h k_h^T) / sqrt(D)) v_h`` through Reshape/Transpose/MatMul/Mul/Softmax, as the plain
    exporter spells scaled_dot_product_attention.
    """
    import onnx
    from onnx import TensorProto, helper

    graph = model.graph
    value_dims = _hidden_sizes(model)
    new_nodes = []
    count = 0
    for node in graph.node:
        if node.op_type != "MultiHeadAttention" or node.domain != CONTRIB_DOMAIN:
            new_nodes.append(node)
            continue
        heads = next(a.i for a in node.attribute if a.name == "num_heads")
        q, k, v = node.input[:3]
        inner = value_dims.get(q)
        if inner is None:
            raise ValueError(f"cannot expand {node.name}: the width of {q!r} is unknown")
        d = inner // heads
        p = f"{node.name or 'mha'}_{count}"

        def const(name, values, dtype=TensorProto.INT64):
            new_nodes.append(helper.make_node(
                "Constant", [], [name], value=helper.make_tensor(name + "_v", dtype, [len(values)], values)))
            return name

        split = const(f"{p}_heads_shape", [0, 0, heads, d])
        merged = const(f"{p}_merged_shape", [0, 0, heads * d])
        scale = f"{p}_scale"
        new_nodes.append(helper.make_node("Constant", [], [scale], value=helper.make_tensor(
            scale + "_v", TensorProto.FLOAT, [], [1.0 / float(d) ** 0.5])))
        for name, perm in ((q, [0, 2, 1, 3]), (k, [0, 2, 3, 1]), (v, [0, 2, 1, 3])):
            new_nodes.append(helper.make_node("Reshape", [name, split], [f"{p}_{name}_4d"]))
            new_nodes.append(helper.make_node("Transpose", [f"{p}_{name}_4d"], [f"{p}_{name}_t"], perm=perm))
        new_nodes += [
            helper.make_node("MatMul", [f"{p}_{q}_t", f"{p}_{k}_t"], [f"{p}_scores"]),
            helper.make_node("Mul", [f"{p}_scores", scale], [f"{p}_scaled"]),
            helper.make_node("Softmax", [f"{p}_scaled"], [f"{p}_probs"], axis=-1),
            helper.make_node("MatMul", [f"{p}_probs", f"{p}_{v}_t"], [f"{p}_ctx"]),
            helper.make_node("Transpose", [f"{p}_ctx"], [f"{p}_ctx_t"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [f"{p}_ctx_t", merged], [node.output[0]]),
        ]
        count += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    if not any(n.domain == CONTRIB_DOMAIN for n in graph.node):
        keep = [o for o in model.opset_import if o.domain != CONTRIB_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(keep)
    return count


def _hidden_sizes(model) -> dict[str, int]:
    """The last dimension of every value whose shape inference knows it (weights of the q/k/v MatMuls)."""
    import onnx

    dims: dict[str, int] = {}
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        # q, k and v come from MatMul(x, W) with W [in, out] (diffusers' to_q/to_k/to_v have no bias)
        if node.op_type == "MatMul" and node.input[1] in inits:
            w = inits[node.input[1]]
            if len(w.dims) == 2:
                dims[node.output[0]] = int(w.dims[1])
        elif node.op_type == "Add" and node.input[0] in dims:
            dims[node.output[0]] = dims[node.input[0]]
    del onnx
    return dims
