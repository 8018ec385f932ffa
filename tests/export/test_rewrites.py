"""The CPU graph forms (sdrt/export/rewrites.py) compute what PyTorch computes."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from sdrt.export.rewrites import groupnorm_as_layernorm, split_geglu  # noqa: E402


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
