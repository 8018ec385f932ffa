"""The CPU graph forms (sdrt/export/rewrites.py) compute what PyTorch computes."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from sdrt.export.rewrites import groupnorm_as_layernorm, linear_as_matmul, split_geglu  # noqa: E402


def test_split_geglu_is_diffusers_geglu_and_is_undone_after():
    from diffusers.models.activations import GEGLU

    torch.manual_seed(0)
    net = torch.nn.Sequential(GEGLU(16, 24), torch.nn.Linear(24, 8))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        reference = net(x)
        with split_geglu(net) as n:
            split = net(x)
            assert n == 1
            assert "forward" in vars(net[0])
        after = net(x)
    assert "forward" not in vars(net[0]), "the patched forward must be removed on exit"
    torch.testing.assert_close(split, reference, rtol=1e-6, atol=1e-6)
    assert torch.equal(after, reference)


def _param_bytes(net) -> int:
    return sum(p.numel() * p.element_size() for p in net.parameters())


class _Tied(torch.nn.Module):
    """Linears over tokens (3-D, the exporter's MatMul case) and over vectors (2-D), two sharing one weight."""

    def __init__(self):
        super().__init__()
        from diffusers.models.activations import GEGLU

        self.a = torch.nn.Linear(16, 32)
        self.geglu = GEGLU(32, 24)
        self.b = torch.nn.Linear(24, 16, bias=False)
        self.c = torch.nn.Linear(24, 16, bias=False)
        self.c.weight = self.b.weight
        self.v = torch.nn.Linear(16, 8)

    def forward(self, x):
        h = self.b(self.geglu(self.a(x))) + self.c(self.geglu(self.a(x)))
        return h, self.v(h.mean(1))


def test_linear_as_matmul_same_numbers_no_copy_and_undone_after():
    torch.manual_seed(0)
    net = _Tied().eval()
    x = torch.randn(2, 5, 16)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    nbytes = _param_bytes(net)
    with torch.no_grad():
        reference = net(x)
        with split_geglu(net), linear_as_matmul(net) as n:
            assert n == 4  # a, b, c, v (GEGLU's projection is the split's)
            assert "weight" not in net.a._parameters and net.a.weight_t.shape == (16, 32)
            assert net.a.weight.shape == (32, 16), ".weight still reads with the Linear's layout"
            assert net.b.weight_t is net.c.weight_t, "a shared weight stays shared"
            assert _param_bytes(net) == nbytes, "the transposed weights replace the originals, never add to them"
            patched = net(x)
        after = net(x)
    for r, p in zip(reference, patched):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)
    for r, a in zip(reference, after):
        assert torch.equal(a, r)
    assert net.b.weight is net.c.weight
    assert sorted(net.state_dict()) == sorted(before)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    assert not any("forward" in vars(m) for m in net.modules())


def test_linear_as_matmul_export_folds_no_weight_copy(tmp_path):
    """Traced inside the block, every Linear's MatMul reads its weight_t initializer: no Transpose of a weight
    is left for the exporter to fold into a second copy; ONNX Runtime computes what PyTorch does."""
    torch.manual_seed(0)
    net = _Tied().eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        reference = net(x)
    path = tmp_path / "tied.onnx"
    with torch.no_grad(), split_geglu(net), linear_as_matmul(net):
        torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["h", "v"], dynamic_axes={"x": {0: "n", 1: "t"}})
    model = onnx.load(str(path))
    weight_bytes = {i.name: len(i.raw_data) for i in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "Transpose"]
    matmul_weights = {i for n in model.graph.node if n.op_type == "MatMul" for i in n.input if i in weight_bytes}
    assert {w.rsplit(".", 1)[-1] for w in matmul_weights} == {"weight_t", "value_t", "gate_t"}
    # stored once each: the Linears' and halves' weights (b and c share one), nothing folded beside them
    stored = sum(b for name, b in weight_bytes.items() if name in matmul_weights)
    assert stored == 4 * (16 * 32 + 32 * 48 + 24 * 16 + 16 * 8)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.randn(3, 7, 16)
    with torch.no_grad():
        expected = net(x2)
    for got, want in zip(sess.run(None, {"x": x2.numpy()}), expected):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


class _Norms(torch.nn.Module):
    """GroupNorm + SiLU on images, and GroupNorm on [N, C, L] tokens (the VAE's attention block)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.GroupNorm(4, 16, eps=1e-6)
        self.b = torch.nn.GroupNorm(8, 16, eps=1e-5)
        for gn in (self.a, self.b):
            torch.nn.init.normal_(gn.weight)
            torch.nn.init.normal_(gn.bias)

    def forward(self, x):
        y = torch.nn.functional.silu(self.a(x))
        n, c, h, w = y.shape
        return self.b(y.view(n, c, h * w)).view(n, c, h, w) + x


def _export(module, path, x):
    with torch.no_grad():
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "h", 3: "w"}})
    return onnx.load(str(path))


def test_groupnorm_as_layernorm_matches_torch_at_other_shapes(tmp_path):
    torch.manual_seed(0)
    net = _Norms().eval()
    model = _export(net, tmp_path / "gn.onnx", torch.randn(1, 16, 6, 6))
    assert sum(n.op_type == "InstanceNormalization" for n in model.graph.node) == 2
    assert groupnorm_as_layernorm(model) == 2
    ops = [n.op_type for n in model.graph.node]
    assert "InstanceNormalization" not in ops and ops.count("LayerNormalization") == 2
    onnx.checker.check_model(model)
    x = (np.random.default_rng(0).standard_normal((3, 16, 5, 9)) * 4 + 2).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6


def test_groupnorm_rewrite_leaves_instance_norm_with_its_own_affine_alone(tmp_path):
    net = torch.nn.InstanceNorm2d(8, affine=True).eval()
    torch.nn.init.normal_(net.weight)
    model = _export(net, tmp_path / "in.onnx", torch.randn(1, 8, 4, 4))
    before = [n.op_type for n in model.graph.node]
    assert groupnorm_as_layernorm(model) == 0
    assert [n.op_type for n in model.graph.node] == before


def test_groupnorm_rewrite_does_not_need_the_weights_file(tmp_path):
    """Gamma and beta in an external-data file (as in the SD1.5 VAE): the rewrite reads shapes, not values."""
    model = _export(_Norms().eval(), tmp_path / "gn.onnx", torch.randn(1, 16, 6, 6))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    light = onnx.load(str(tmp_path / "ext.onnx"), load_external_data=False)
    assert groupnorm_as_layernorm(light) == 2
    onnx.save_model(light, str(tmp_path / "fast.onnx"))  # beside ext.onnx.data, which it still references
    x = np.random.default_rng(1).standard_normal((1, 16, 3, 4), dtype=np.float32)
    a, b = (ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for f in ("fast.onnx", "gn.onnx"))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
