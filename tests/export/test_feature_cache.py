"""The feature-caching pair in PyTorch (sdrt.export.feature_cache), and the export options' refusals."""

from __future__ import annotations

import pytest

from tests.conftest import assert_one_line_error, run_cli

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("kind", ["sd1-tiny", "sd2-tiny"])
def test_the_pair_equals_the_unet_at_every_branch(model_dirs, kind):
    """The deep UNet is the UNet, operation for operation; the shallow UNet fed the deep UNet's feature from the
    same inputs returns the same output; at a size the upsamplers must be told (odd) and one they double."""
    import json

    from diffusers import UNet2DConditionModel

    from sdrt.export.feature_cache import DeepUNetGraph, ShallowUNetGraph, branch_count, branch_count_from_config

    unet = UNet2DConditionModel.from_pretrained(model_dirs[kind] / "unet").eval()
    count = branch_count(unet)
    assert count == branch_count_from_config(json.loads((model_dirs[kind] / "unet" / "config.json").read_text()))
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 4, 8, 8), (1, 4, 9, 11)):
        x = torch.randn(shape, generator=g)
        t = torch.tensor([321.0] * shape[0])
        ctx = torch.randn(shape[0], 77, unet.config.cross_attention_dim, generator=g)
        with torch.no_grad():
            want = unet(x, t, ctx).sample
            features = set()
            for branch in range(count):
                out, feature = DeepUNetGraph(unet, branch)(x, t, ctx)
                assert torch.equal(out, want), (shape, branch)
                assert torch.equal(ShallowUNetGraph(unet, branch)(x, t, ctx, feature), want), (shape, branch)
                features.add(tuple(feature.shape))
            # a stale feature changes the output: the shallow UNet really reads it
            stale = ShallowUNetGraph(unet, 0)(x, t, ctx, torch.zeros_like(DeepUNetGraph(unet, 0)(x, t, ctx)[1]))
            assert not torch.allclose(stale, want)
        assert len(features) > 1  # branches cut at different depths
    with pytest.raises(ValueError, match=f"branches 0 to {count - 1}"):
        DeepUNetGraph(unet, count)


def test_export_refuses_bad_cache_and_tiny_vae_options_in_one_line(sd1_model, tmp_path):
    from diffusers import AutoencoderTiny

    r = run_cli("export", sd1_model, tmp_path / "e1", "--cache-branch", 99, "-q")
    assert_one_line_error(r, "--cache-branch 99", "branches 0 to 3")
    wrong = tmp_path / "taesd"
    AutoencoderTiny().save_pretrained(wrong)   # TAESD's own: x8, the tiny SD1's VAE is x2
    r = run_cli("export", sd1_model, tmp_path / "e2", "--tiny-vae", wrong, "-q")
    assert_one_line_error(r, "--tiny-vae", "x8", "needs 4 x2")
    r = run_cli("export", sd1_model, tmp_path / "e3", "--tiny-vae", wrong, "--components", "unet", "-q")
    assert_one_line_error(r, "--tiny-vae", "vae_decoder")
    r = run_cli("export", sd1_model, tmp_path / "e4", "--tiny-vae", sd1_model / "vae", "-q")
    assert_one_line_error(r, "--tiny-vae", "AutoencoderKL", "AutoencoderTiny")
    assert not any(tmp_path.glob("e*")) and not any(tmp_path.glob(".e*"))
