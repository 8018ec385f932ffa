"""`sdrt export --controlnet PATH[:NAME]` and `--add`: tiny random ControlNets and T2I-Adapters (tools/make_models.py)
exported as their own graphs with the UNet graphs taking their residuals; what the graphs compute equals diffusers
(the runtime's numpy scaling included); adding to an engine directory touches nothing else; the refusals."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from tests.conftest import assert_one_line_error, run_cli

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def controls(model_dirs, tmp_path_factory) -> dict:
    """A ControlNet and a T2I-Adapter made for sd1-tiny; a ControlNet made for sd2-tiny (another context width);
    one for sd1-tiny whose conditioning embedding downsamples 8x (another VAE) and its original-layout file."""
    from tools.make_models import make_controlnet, make_t2i_adapter
    from tools.to_single_file import controlnet_to_single_file

    base = tmp_path_factory.mktemp("controls")
    sd1, sd2 = model_dirs["sd1-tiny"], model_dirs["sd2-tiny"]
    out = {"cn": make_controlnet(sd1, base / "cn", seed=1), "adapter": make_t2i_adapter(sd1, base / "adapter", seed=2),
           "sd2": make_controlnet(sd2, base / "sd2", seed=3),
           "x8": make_controlnet(sd1, base / "x8", seed=4, embedding=(16, 32, 96, 256))}
    out["x8-file"] = controlnet_to_single_file(out["x8"], base / "control_x8.safetensors")
    return out


@pytest.fixture(scope="module")
def cn_engine(sd1_model, controls, tmp_path_factory):
    from sdrt.export import export_model

    engine = tmp_path_factory.mktemp("cn") / "engine"
    export_model(sd1_model, engine, progress=False, components="text_encoder,unet,vae_decoder",
                 controlnets=[f"{controls['cn']}:canny", (controls["adapter"], "sketch")], log=lambda m: None)
    return engine


def manifest(engine):
    return json.loads((engine / "sdrt.json").read_text())


def test_export_writes_each_graph_checked_and_recorded(cn_engine):
    from sdrt.runtime.manifest import Manifest

    m = manifest(cn_engine)
    comps = m["components"]
    assert {"controlnet/canny", "controlnet/sketch", "unet_control", "unet_adapter"} <= set(comps)
    for name in ("controlnet/canny", "controlnet/sketch", "unet_control", "unet_adapter"):
        entry = comps[name]
        assert entry["parity"]["rel_l2"] <= 1e-4, name
        for v in entry.get("variants", {}).values():
            assert v["parity"]["rel_l2"] <= 1e-4, name
    assert comps["controlnet/canny"]["file"] == "controlnet/canny/model.onnx"
    cn = comps["controlnet/canny"]
    assert [i["name"] for i in cn["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond"]
    assert cn["inputs"][3]["shape"] == ["batch", 3, "height", "width"]
    outs = [o["name"] for o in cn["outputs"]]
    assert outs == ["down_residual_0", "down_residual_1", "down_residual_2", "down_residual_3", "mid_residual"]
    assert cn["outputs"][2]["shape"] == ["batch", 32, "latent_height_1", "latent_width_1"]
    # the residual UNet takes the ControlNet's outputs, and is written over the UNet's own weights file
    ctrl = comps["unet_control"]
    assert [i["name"] for i in ctrl["inputs"]] == ["sample", "timestep", "encoder_hidden_states"] + outs
    assert ctrl["inputs"][3:] == cn["outputs"]
    assert ctrl["file"] == "unet/control.onnx" and ctrl["data_file"] == "model.onnx.data"
    assert ctrl["variants"]["cpu"]["file"] == "unet/control.ort.onnx"
    assert comps["unet_adapter"]["file"] == "unet/adapter.onnx"
    assert sorted(p.name for p in (cn_engine / "unet").glob("*.data")) == ["model.onnx.data"]
    rec = m["controlnets"]["canny"]
    assert rec["kind"] == "controlnet" and rec["unet"] == "unet_control" and rec["residuals"] == outs
    assert rec["base"] == ctrl["base"] and rec["base"]["cross_attention_dim"] == 32
    assert rec["image_multiple"] == m["model"]["vae_scale_factor"] and rec["global_pool_conditions"] is False
    assert len(rec["source"]["sha256"]) == 64 and rec["source"]["format"] == "diffusers"
    ad = m["controlnets"]["sketch"]
    assert ad["kind"] == "t2i_adapter" and ad["unet"] == "unet_adapter"
    assert ad["residuals"] == ["adapter_feature_0", "adapter_feature_1"]
    Manifest.load(cn_engine, verify="sha256")  # every recorded sha256 and size holds


def test_the_plain_pipeline_still_runs_such_an_engine(cn_engine):
    """The new components and section are beside the old ones: the pipeline, which does not use them yet, loads
    and runs the engine as before."""
    from sdrt.runtime import Pipeline

    result = Pipeline(cn_engine).generate("a red square", steps=2, seed=1, height=16, width=16)
    assert result.images[0].shape == (16, 16, 3)


def test_residual_unet_shares_the_unet_weights_under_their_names(cn_engine):
    """No weight of its own: every external initializer is one of the UNet graph's, same name, same bytes."""
    import onnx

    plain = onnx.load(str(cn_engine / "unet" / "model.onnx"), load_external_data=False)
    where = {t.name: [(e.key, e.value) for e in t.external_data] for t in plain.graph.initializer if t.external_data}
    for stem in ("control", "control.ort", "adapter", "adapter.ort"):
        graph = onnx.load(str(cn_engine / "unet" / f"{stem}.onnx"), load_external_data=False)
        ext = {t.name: [(e.key, e.value) for e in t.external_data] for t in graph.graph.initializer if t.external_data}
        assert ext and all(where.get(n) == loc for n, loc in ext.items()), stem


def _ort(engine, entry, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(engine / entry["file"]), providers=["CPUExecutionProvider"])
    return dict(zip([o["name"] for o in entry["outputs"]], session.run(None, feeds)))


@pytest.mark.parametrize("scale, guess", [(0.7, False), (1.3, True)])
def test_graphs_with_numpy_scaling_equal_diffusers(sd1_model, controls, cn_engine, scale, guess):
    """ControlNet graph -> residuals scaled in numpy (sdrt.runtime.control) -> unet_control equals diffusers'
    UNet(ControlNet(conditioning_scale, guess_mode)); the adapter's likewise with adapter_conditioning_scale."""
    from diffusers import ControlNetModel, T2IAdapter, UNet2DConditionModel

    from sdrt.runtime.control import residual_scales, scaled

    m = manifest(cn_engine)
    unet = UNet2DConditionModel.from_pretrained(sd1_model / "unet").eval()
    cn = ControlNetModel.from_pretrained(controls["cn"]).eval()
    adapter = T2IAdapter.from_pretrained(controls["adapter"]).eval()
    g = torch.Generator().manual_seed(7)
    x, t = torch.randn(2, 4, 9, 11, generator=g), torch.tensor([411.0, 411.0])
    ctx, image = torch.randn(2, 154, 32, generator=g), torch.rand(2, 3, 18, 22, generator=g)
    with torch.no_grad():
        down, mid = cn(x, t, ctx, image, conditioning_scale=scale, guess_mode=guess, return_dict=False)
        want = unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample.numpy()
        features = [f * scale for f in adapter(image)]
        want_ad = unet(x, t, ctx, down_intrablock_additional_residuals=features).sample.numpy()
    feeds = {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ctx.numpy()}
    rec = m["controlnets"]["canny"]
    res = _ort(cn_engine, m["components"][rec["component"]], {**feeds, "controlnet_cond": image.numpy()})
    res = scaled(res, rec["residuals"], residual_scales(len(rec["residuals"]), scale, guess))
    got = _ort(cn_engine, m["components"]["unet_control"], {**feeds, **res})["out_sample"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    rec = m["controlnets"]["sketch"]
    feats = _ort(cn_engine, m["components"][rec["component"]], {"controlnet_cond": image.numpy()})
    feats = scaled(feats, rec["residuals"], [scale] * len(rec["residuals"]))
    got = _ort(cn_engine, m["components"]["unet_adapter"], {**feeds, **feats})["out_sample"]
    np.testing.assert_allclose(got, want_ad, rtol=1e-4, atol=1e-4)


def _tree(engine):
    return {str(p.relative_to(engine)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(engine.rglob("*")) if p.is_file()}


def test_add_to_an_existing_engine_exports_nothing_else(sd1_model, sd1_engine, controls, tmp_path):
    from sdrt.export import export_model
    from sdrt.runtime.manifest import Manifest

    engine = tmp_path / "engine"
    shutil.copytree(sd1_engine, engine)
    before = _tree(engine)
    lines = []
    export_model(sd1_model, engine, add=True, controlnets=[f"{controls['cn']}:canny"], log=lines.append)
    after = _tree(engine)
    changed = {k for k in before if after.get(k) != before[k]}
    assert changed == {"sdrt.json"}, changed
    assert set(after) - set(before) == {"controlnet/canny/model.onnx", "controlnet/canny/model.onnx.data",
                                        "controlnet/canny/model.ort.onnx", "unet/control.onnx", "unet/control.ort.onnx"}
    assert lines[-1].endswith("nothing else re-exported") and "controlnet/canny, unet_control" in lines[-1]
    m = manifest(engine)
    old = json.loads((sd1_engine / "sdrt.json").read_text())
    assert {k: v for k, v in m["components"].items() if k in old["components"]} == old["components"]
    assert m["controlnets"]["canny"]["unet"] == "unet_control"
    Manifest.load(engine, verify="sha256")
    # a second ControlNet: its graph only (unet_control is there); the same name again needs --force
    before = _tree(engine)
    export_model(sd1_model, engine, add=True, controlnets=[f"{controls['cn']}:canny2"], log=lines.append)
    assert set(_tree(engine)) - set(before) == {f"controlnet/canny2/{f}" for f in
                                                ("model.onnx", "model.onnx.data", "model.ort.onnx")}
    assert {k for k, v in before.items() if _tree(engine)[k] != v} == {"sdrt.json"}
    r = run_cli("export", sd1_model, engine, "--add", "--controlnet", f"{controls['cn']}:canny", "-q")
    assert_one_line_error(r, "'canny' is already in", "--force")
    export_model(sd1_model, engine, add=True, force=True, controlnets=[f"{controls['adapter']}:canny"],
                 log=lines.append)
    m = manifest(engine)
    assert m["controlnets"]["canny"]["kind"] == "t2i_adapter" and "unet_adapter" in m["components"]
    Manifest.load(engine, verify="sha256")
    assert not [p for p in engine.parent.iterdir() if p.name.startswith(".")]
    assert not list((engine / "unet").glob(".*"))


def test_refusals_are_one_line(sd1_model, sd2_model, sd1_engine, controls, tmp_path):
    # a ControlNet made for another model: its UNet's context width
    r = run_cli("export", sd1_model, tmp_path / "a", "-q", "--controlnet", controls["sd2"])
    assert_one_line_error(r, "cross_attention_dim=64", "has 32", "made for another model")
    # its conditioning embedding downsamples 8x; this model's latents are 1/2 of the image
    r = run_cli("export", sd1_model, tmp_path / "b", "-q", "--controlnet", controls["x8"])
    assert_one_line_error(r, "downsamples the control image 8x", "1/2")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # --add: to an engine exported from another checkpoint; other export options; no ControlNet
    engine = tmp_path / "e"
    shutil.copytree(sd1_engine, engine)
    r = run_cli("export", sd2_model, engine, "--add", "--controlnet", controls["sd2"], "-q")
    assert_one_line_error(r, "was not exported from")
    r = run_cli("export", sd1_model, engine, "--add", "--controlnet", controls["cn"], "--components", "unet", "-q")
    assert_one_line_error(r, "--add exports only --controlnet", "--components")
    r = run_cli("export", sd1_model, engine, "--add", "-q")
    assert_one_line_error(r, "--controlnet PATH[:NAME]")
    r = run_cli("export", sd1_model, tmp_path / "c", "-q", "--controlnet", f"{controls['cn']}:bad/name")
    assert_one_line_error(r, "'bad/name'", "letters, digits")
    r = run_cli("export", sd1_model, tmp_path / "c", "-q", "--controlnet", tmp_path)
    assert_one_line_error(r, "not a diffusers ControlNetModel/T2IAdapter folder")


def test_original_layout_file_is_told_by_its_keys_and_converted_offline(sd1_model, controls):
    """control_*.safetensors (control_model.* keys): the name drops control_, the conditioning embedding is read
    from the shapes, diffusers converts it with no network to the weights it was written from; made for a 2x VAE
    model, an 8x embedding is refused."""
    from diffusers import ControlNetModel

    from sdrt.errors import UserError
    from sdrt.export.control_sources import inspect_control, load_control

    unet_config = json.loads((sd1_model / "unet" / "config.json").read_text())
    src = inspect_control(controls["x8-file"], unet_config, {"vae_scale_factor": 8})
    assert src.name == "x8" and src.format == "original" and src.config["conditioning_embedding_out_channels"] == [
        16, 32, 96, 256]
    converted = load_control(src, allow_pickle=False).state_dict()
    original = ControlNetModel.from_pretrained(controls["x8"]).state_dict()
    assert converted.keys() == original.keys() and all(torch.equal(converted[k], original[k]) for k in original)
    with pytest.raises(UserError, match="downsamples the control image 8x"):
        inspect_control(controls["x8-file"], unet_config, {"vae_scale_factor": 2})
    other = dict(unet_config, cross_attention_dim=64)
    with pytest.raises(UserError, match="cross_attention_dim=32; this model's UNet has 64"):
        inspect_control(controls["x8-file"], other, {"vae_scale_factor": 8})


def test_sdxl_controlnet_and_adapter(tmp_path):
    """SDXL: the ControlNet reads text_embeds and time_ids too; the adapter (full_adapter_xl: SDXL's first block adds
    it after downsampling) feeds unet_adapter; graph + numpy scaling equals diffusers."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from sdrt.export import export_model
    from sdrt.runtime.control import residual_scales, scaled
    from tools.make_models import make_controlnet, make_model, make_t2i_adapter

    model = make_model("sdxl-tiny", tmp_path / "xl", seed=0)
    cn, adapter = make_controlnet(model, tmp_path / "cn", seed=1), make_t2i_adapter(model, tmp_path / "ad", seed=2)
    engine = tmp_path / "engine"
    m = export_model(model, engine, progress=False, components="text_encoder,text_encoder_2,unet",
                     controlnets=[f"{cn}:c", f"{adapter}:a"], log=lambda s: None)
    comps = m["components"]
    assert [i["name"] for i in comps["controlnet/c"]["inputs"]] == [
        "sample", "timestep", "encoder_hidden_states", "controlnet_cond", "text_embeds", "time_ids"]
    assert all(comps[c]["parity"]["rel_l2"] <= 1e-4 for c in ("controlnet/c", "controlnet/a", "unet_control",
                                                                "unet_adapter"))
    assert m["controlnets"]["a"]["image_multiple"] == 4 and m["controlnets"]["c"]["image_multiple"] == 2
    unet = UNet2DConditionModel.from_pretrained(model / "unet").eval()
    net = ControlNetModel.from_pretrained(cn).eval()
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 8, 12, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 80, generator=g)
    added = {"text_embeds": torch.randn(1, 24, generator=g), "time_ids": torch.tensor([[16.0, 24, 0, 0, 16, 24]])}
    image = torch.rand(1, 3, 16, 24, generator=g)
    with torch.no_grad():
        down, mid = net(x, t, ctx, image, conditioning_scale=0.6, added_cond_kwargs=added, return_dict=False)
        want = unet(x, t, ctx, added_cond_kwargs=added, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample.numpy()
    feeds = {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ctx.numpy(),
             **{k: v.numpy() for k, v in added.items()}}
    rec = m["controlnets"]["c"]
    res = _ort(engine, comps["controlnet/c"], {**feeds, "controlnet_cond": image.numpy()})
    res = scaled(res, rec["residuals"], residual_scales(len(rec["residuals"]), 0.6))
    np.testing.assert_allclose(_ort(engine, comps["unet_control"], {**feeds, **res})["out_sample"], want,
                               rtol=1e-4, atol=1e-4)
