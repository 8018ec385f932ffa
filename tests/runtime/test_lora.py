"""LoRAs at run time: the export's weight map, the numpy deltas handed to the backend as initializer overrides,
against diffusers' load_lora_weights with the same files and scales; and every refusal."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sdrt.errors import UserError
from sdrt.runtime.images import images_psnr
from tests.conftest import assert_one_line_error, run_cli

torch = pytest.importorskip("torch")
from sdrt.bench.reference import diffusers_pipeline  # noqa: E402

PSNR_FLOOR_DB = 40.0
SCALES = (0.8, 0.5)
SETTINGS = dict(steps=6, guidance=7.5, seed=11)
PROMPT = "a red circle on a blue background"


def rel_l2(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def reference(model, loras):
    """diffusers with each LoRA as its own adapter, weighted by its scale."""
    pipe = diffusers_pipeline(model)
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
    pipe.set_adapters([f"l{i}" for i in range(len(loras))], adapter_weights=[s for _, s in loras])
    return pipe


def reference_image(pipe, **kw):
    out = pipe(PROMPT, num_inference_steps=kw["steps"], guidance_scale=kw["guidance"],
               generator=torch.Generator("cpu").manual_seed(kw["seed"]), output_type="np").images[0]
    return (out * 255).round().astype(np.uint8)


def unet_feeds(model, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    s = model.sample_size
    return {"sample": rng.standard_normal((batch, model.latent_channels, s, s + 2), dtype=np.float32),
            "timestep": np.array([999.0, 20.0][:batch], np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, model.text_max_length, model.text_hidden_size),
                                                         dtype=np.float32)}


@pytest.fixture(scope="module")
def plain_pipes(engine_dirs):
    from sdrt.runtime import Pipeline

    return {kind: Pipeline(path) for kind, path in engine_dirs.items()}


# ---- the weight map ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd1-tiny", "sd2-tiny"])
def test_the_weight_map_locates_every_linear_and_conv(engine_dirs, model_dirs, kind):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdrt.runtime.manifest import Manifest
    from sdrt.runtime.onnx_weights import graph_initializers

    m = Manifest.load(engine_dirs[kind])
    models = {"unet": UNet2DConditionModel.from_pretrained(model_dirs[kind] / "unet"),
              "text_encoder": CLIPTextModel.from_pretrained(model_dirs[kind] / "text_encoder")}
    for comp, model in models.items():
        record = json.loads((m.engine_dir / m.component(comp)["weight_map"]["file"]).read_text())
        weights = record["weights"]
        expected = {f"{n}.weight": mod.weight for n, mod in model.named_modules()
                    if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))}
        assert set(weights) == set(expected) and len(weights) > 10, comp
        assert all("initializers" in e for e in weights.values()), [w for w, e in weights.items() if "unmapped" in e]
        for graph in [m.graph_path(comp)] + ([m.graph_path(comp, "cpu")] if comp == "unet" else []):
            stored = graph_initializers(graph)
            for name, entry in weights.items():
                w = expected[name].detach().numpy()
                assert entry["shape"] == list(w.shape)
                for place in entry["initializers"]:
                    part = w[slice(*place["rows"])] if "rows" in place else w
                    part = part.T if place["transpose"] else part
                    np.testing.assert_array_equal(stored[place["name"]].read().reshape(part.shape), part)
        places = [p for e in weights.values() for p in e["initializers"]]
        assert any(p["transpose"] for p in places), "a Linear's MatMul weight is stored transposed"
        if comp == "unet":  # GEGLU's projection: two halves (sdrt.export.rewrites.split_geglu)
            geglu = [e for w, e in weights.items() if w.endswith("ff.net.0.proj.weight")]
            assert geglu and all([p["rows"] for p in e["initializers"]] == [[0, e["shape"][0] // 2],
                                                                              [e["shape"][0] // 2, e["shape"][0]]]
                                 for e in geglu)


# ---- parity with diffusers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd1-tiny", "sd2-tiny"])
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_two_loras_at_run_time_match_diffusers(engine_dirs, model_dirs, lora_files, plain_pipes, kind, fmt):
    from sdrt.runtime import Pipeline

    loras = list(zip(lora_files[kind, fmt], SCALES))
    pipe = Pipeline(engine_dirs[kind], loras=loras)
    ref = reference(model_dirs[kind], loras)
    # per component, at the same inputs
    ids = pipe.tokenizer.encode([PROMPT, ""])
    want = ref.text_encoder(torch.from_numpy(ids))[0].detach().numpy()
    assert rel_l2(pipe.encode_prompts([PROMPT, ""]), want) <= 1e-5
    assert rel_l2(plain_pipes[kind].encode_prompts([PROMPT, ""]), want) > 1e-2, "the LoRA changed nothing"
    feeds = unet_feeds(pipe.model)
    with torch.no_grad():
        want = ref.unet(*(torch.from_numpy(feeds[n]) for n in ("sample", "timestep", "encoder_hidden_states"))).sample
    assert rel_l2(pipe.sessions["unet"].run(feeds)["out_sample"], want.numpy()) <= 1e-4
    assert rel_l2(plain_pipes[kind].sessions["unet"].run(feeds)["out_sample"], want.numpy()) > 1e-2
    # and the pictures
    ours = pipe.generate(PROMPT, **SETTINGS).images[0]
    theirs = reference_image(ref, **SETTINGS)
    psnr = images_psnr(ours, theirs)
    print(f"{kind} {fmt}: image PSNR vs diffusers {psnr:.1f} dB")
    assert psnr >= PSNR_FLOOR_DB
    assert images_psnr(plain_pipes[kind].generate(PROMPT, **SETTINGS).images[0], theirs) < 35
    pipe.close()


@pytest.mark.parametrize("fmt", ["kohya-sgm", "peft"])
def test_sdxl_loras_on_both_text_encoders_and_the_unet_match_diffusers(tiny_model, tmp_path, fmt):
    """SDXL: kohya files as sd-scripts writes them (lora_te1_/lora_te2_, the UNet in the original layout's
    names, mapped as diffusers maps them) and diffusers/peft files, at run time, against load_lora_weights."""
    from sdrt.runtime import Pipeline
    from tools.make_loras import make_lora

    model, engine = tiny_model("sdxl-tiny")
    lora = make_lora(model, tmp_path / f"{fmt}.safetensors", fmt.split("-")[0], rank=4, alpha=2.0, seed=11,
                     conv=True, sgm=fmt == "kohya-sgm")
    pipe = Pipeline(engine, loras=[(lora, 0.8)])
    assert sorted(pipe.loras[0][0].components) == ["text_encoder", "text_encoder_2", "unet"]
    ref = reference(model, [(lora, 0.8)])
    ours = pipe.generate(PROMPT, **SETTINGS).images[0]
    theirs = reference_image(ref, **SETTINGS)
    psnr = images_psnr(ours, theirs)
    print(f"sdxl-tiny {fmt}: image PSNR vs diffusers {psnr:.1f} dB")
    assert psnr >= PSNR_FLOOR_DB
    assert images_psnr(Pipeline(engine).generate(PROMPT, **SETTINGS).images[0], theirs) < 35, "the LoRA changed nothing"
    pipe.close()


def test_a_second_encoder_lora_is_refused_on_a_one_encoder_engine(sd1_engine, tiny_model, tmp_path):
    from sdrt.runtime import Pipeline
    from tools.make_loras import make_lora

    lora = make_lora(tiny_model("sdxl-tiny")[0], tmp_path / "xl.safetensors", "kohya", seed=1, sgm=True)
    with pytest.raises(UserError, match="text_encoder_2, which .* does not have"):
        Pipeline(sd1_engine, loras=[lora])


def test_the_scale_is_linear_and_zero_is_no_lora(sd1_engine, lora_files, plain_pipes):
    from sdrt.runtime import Pipeline

    lora = lora_files["sd1-tiny", "kohya"][1]
    feeds = unet_feeds(plain_pipes["sd1-tiny"].model)
    out = {s: Pipeline(sd1_engine, loras=[(lora, s)]).sessions["unet"].run(feeds)["out_sample"] for s in (0.0, 1.0)}
    plain = plain_pipes["sd1-tiny"].sessions["unet"].run(feeds)["out_sample"]
    np.testing.assert_allclose(out[0.0], plain, rtol=1e-5, atol=1e-6)
    assert rel_l2(out[1.0], plain) > 1e-2


@pytest.mark.parametrize("kind", ["sd1-tiny"])
def test_openvino_applies_the_same_patch(engine_dirs, lora_files, kind):
    pytest.importorskip("openvino")
    from sdrt.runtime import Pipeline

    loras = list(zip(lora_files[kind, "kohya"], SCALES))
    cpu = Pipeline(engine_dirs[kind], loras=loras)
    ov = Pipeline(engine_dirs[kind], backend="openvino", loras=loras)
    feeds = unet_feeds(cpu.model)
    assert rel_l2(ov.sessions["unet"].run(feeds)["out_sample"], cpu.sessions["unet"].run(feeds)["out_sample"]) <= 1e-4
    assert rel_l2(ov.encode_prompts([PROMPT]), cpu.encode_prompts([PROMPT])) <= 1e-5


# ---- formats: alpha, rank and peft's patterns -----------------------------------------------------------------

def _write(path, tensors, metadata=None):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_alpha_rank_and_peft_metadata(tmp_path):
    from sdrt.runtime.lora import LoraFile

    rng = np.random.default_rng(0)
    down, up = rng.standard_normal((4, 6), dtype=np.float32), rng.standard_normal((5, 4), dtype=np.float32)
    full = up @ down
    kohya = LoraFile.load(_write(tmp_path / "k.safetensors", {
        "lora_unet_a_b.lora_down.weight": down, "lora_unet_a_b.lora_up.weight": up,
        "lora_unet_a_b.alpha": np.array(1.0, np.float32),
        "lora_te_c.lora_down.weight": down, "lora_te_c.lora_up.weight": up}))
    assert kohya.format == "kohya" and kohya.components == ["text_encoder", "unet"]
    layer = kohya.match("unet", ["a.b.weight", "a.c.weight"])["a.b.weight"]
    np.testing.assert_allclose(layer.delta((5, 6), 2.0), full * 2.0 / 4, rtol=1e-6)      # alpha 1 / rank 4
    np.testing.assert_allclose(kohya.layers["text_encoder"]["c"].delta((5, 6)), full, rtol=1e-6)  # no alpha
    meta = {"lora_adapter_metadata": json.dumps({
        "unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"x.k": 2}, "unet.rank_pattern": {},
        "text_encoder.r": 4, "text_encoder.lora_alpha": 4, "text_encoder.use_rslora": True})}
    peft = LoraFile.load(_write(tmp_path / "p.safetensors", {
        "unet.x.q.lora_A.weight": down, "unet.x.q.lora_B.weight": up,
        "unet.x.k.lora_A.weight": down, "unet.x.k.lora_B.weight": up,
        "text_encoder.y.lora_A.weight": down, "text_encoder.y.lora_B.weight": up}, meta))
    layers = peft.match("unet", ["x.q.weight", "x.k.weight"])
    np.testing.assert_allclose(layers["x.q.weight"].delta((5, 6)), full * 8 / 4, rtol=1e-6)
    np.testing.assert_allclose(layers["x.k.weight"].delta((5, 6)), full * 2 / 4, rtol=1e-6)   # alpha_pattern
    np.testing.assert_allclose(peft.layers["text_encoder"]["y"].delta((5, 6)), full * 4 / 2, rtol=1e-6)  # rsLoRA
    conv = LoraFile.load(_write(tmp_path / "c.safetensors", {
        "lora_unet_conv.lora_down.weight": rng.standard_normal((2, 3, 3, 3), dtype=np.float32),
        "lora_unet_conv.lora_up.weight": rng.standard_normal((4, 2, 1, 1), dtype=np.float32)}))
    c = conv.layers["unet"]["conv"]
    np.testing.assert_allclose(c.delta((4, 3, 3, 3)),
                               np.einsum("or,rikl->oikl", c.up[:, :, 0, 0], c.down), rtol=1e-5, atol=1e-6)


def test_bf16_and_fp16_files_are_read(tmp_path):
    from sdrt.runtime.safetensors_file import SafetensorsFile

    st = pytest.importorskip("safetensors.torch")
    x = torch.randn(3, 5)
    st.save_file({"a": x.to(torch.bfloat16), "b": x.to(torch.float16)}, str(tmp_path / "x.safetensors"))
    f = SafetensorsFile(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(f.read("a"), x.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(f.read("b"), x.to(torch.float16).numpy())


# ---- refusals -----------------------------------------------------------------------------------------------

def test_keys_that_match_no_weight_are_named(sd1_engine, lora_files, tmp_path):
    from safetensors.numpy import load_file

    from sdrt.runtime import Pipeline

    tensors = load_file(str(lora_files["sd1-tiny", "kohya"][1]))
    for suffix in ("lora_down.weight", "lora_up.weight"):
        tensors[f"lora_unet_down_blocks_7_nothing_here.{suffix}"] = np.ones((2, 2), np.float32)
    bad = _write(tmp_path / "stray.safetensors", tensors)
    with pytest.raises(UserError, match=r"1 unet layer\(s\) match no weight of this model: 'down_blocks_7_nothing_here'"):
        Pipeline(sd1_engine, loras=[bad])


@pytest.mark.parametrize("tensors, needle", [
    ({"lora_unet_x.hada_w1_a": np.ones((2, 2), np.float32)}, "LoHa"),
    ({"lora_unet_x.lora_down.weight": np.ones((2, 2), np.float32), "lora_unet_x.dora_scale": np.ones(2, np.float32)},
     "DoRA"),
    ({"model.diffusion_model.x.weight": np.ones((2, 2), np.float32)}, "no LoRA layout"),
    ({"lora_unet_x.lora_down.weight": np.ones((2, 2), np.float32)}, "has no up weight"),
])
def test_other_kinds_of_file_are_refused(tmp_path, tensors, needle):
    from sdrt.runtime.lora import LoraFile

    with pytest.raises(UserError, match=needle):
        LoraFile.load(_write(tmp_path / "x.safetensors", tensors))


def test_a_lora_for_another_model_is_refused(sd1_engine, lora_files):
    from sdrt.runtime import Pipeline

    with pytest.raises(UserError, match="does not fit the model's weight"):
        Pipeline(sd1_engine, loras=[lora_files["sd2-tiny", "kohya"][0]])


def test_an_sdxl_text_encoder_2_lora_on_sd1_is_refused(sd1_engine, tmp_path):
    from sdrt.runtime import Pipeline

    one = np.ones((2, 32), np.float32)
    f = _write(tmp_path / "te2.safetensors", {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": one,
                                               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": one.T})
    with pytest.raises(UserError, match="patches text_encoder_2, which .* does not have"):
        Pipeline(sd1_engine, loras=[f])


def test_an_engine_without_a_weight_map_is_refused(sd1_engine, lora_files, tmp_path):
    from sdrt.runtime import Pipeline

    engine = tmp_path / "engine"
    shutil.copytree(sd1_engine, engine)
    manifest = json.loads((engine / "sdrt.json").read_text())
    del manifest["components"]["unet"]["weight_map"]
    (engine / "sdrt.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="'unet' has no weight map .* re-export"):
        Pipeline(engine, loras=[lora_files["sd1-tiny", "kohya"][1]])


def test_generate_cli_applies_and_refuses(sd1_engine, lora_files, tmp_path):
    lora = lora_files["sd1-tiny", "peft"][1]
    out = tmp_path / "x.png"
    r = run_cli("generate", sd1_engine, PROMPT, "-o", out, "--steps", "2", "--seed", "3", "-q", "--lora", f"{lora}:0.7")
    assert r.returncode == 0, r.stderr
    from PIL import Image

    with_lora = np.asarray(Image.open(out))
    r = run_cli("generate", sd1_engine, PROMPT, "-o", tmp_path / "y.png", "--steps", "2", "--seed", "3", "-q")
    assert images_psnr(with_lora, np.asarray(Image.open(tmp_path / "y.png"))) < 40, "--lora was not applied"
    assert_one_line_error(run_cli("generate", sd1_engine, PROMPT, "--lora", tmp_path / "none.safetensors"),
                          "none.safetensors", "does not exist")
    assert_one_line_error(run_cli("generate", sd1_engine, PROMPT, "--lora", f"{tmp_path / 'x.safetensors'}:strong"),
                          "SCALE 'strong'", "must be a number")
    pickle = tmp_path / "lora.ckpt"
    pickle.write_bytes(b"\x80\x04.")
    assert_one_line_error(run_cli("generate", sd1_engine, PROMPT, "--lora", pickle), "pickle", ".safetensors")


def test_run_time_loras_refit_refittable_tensorrt_plans(sd1_engine, lora_files, tmp_path, monkeypatch):
    """On --backend tensorrt the LoRA-patched initializers refit a refittable plan, by their ONNX names (TensorRT
    and CUDA replaced by the CPU stand-ins of tests/runtime/fake_trt.py); a plan built without --refittable
    is refused in one line."""
    import sys

    from sdrt.engines.build import plan_jobs, record_entry, write_plan
    from sdrt.engines.profiles import make_request
    from sdrt.runtime.backends import cuda as cuda_mod
    from sdrt.runtime.backends.tensorrt import TensorRTBackend
    from sdrt.runtime.lora import load_loras, lora_initializers
    from sdrt.runtime.manifest import Manifest
    from sdrt.runtime.onnx_weights import graph_initializers
    from tests.runtime.fake_trt import fake_plan, make_cudart, make_tensorrt

    engine = tmp_path / "engine"
    shutil.copytree(sd1_engine, engine)
    trt = make_tensorrt()
    monkeypatch.setattr(cuda_mod, "_cudart", make_cudart())
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    m = Manifest.load(engine)
    stored = graph_initializers(m.graph_path("unet"))
    patched = lora_initializers(m, "unet", load_loras([(lora_files["sd1-tiny", "kohya"][0], 0.7)]))
    assert patched

    def add(refittable):
        req = make_request(m.data["model"], batch="1:1:2", height=None, width=None, static=False)
        (job,) = plan_jobs(m, req, "fp16", ["unet"], trt.__version__, "8.9", refittable=refittable)
        names = {i["name"]: i["dtype"] for i in m.component("unet")["inputs"]}
        plan = fake_plan(names, {"out_sample": ("sample", 1.0)}, job.profiles, refittable=refittable,
                         weights={n: [0.0] * int(np.prod(i.shape)) for n, i in stored.items() if i.dtype == "float32"})
        record_entry(m, "unet", {"key": job.key, "precision": "fp16", "profiles": job.profiles, "static": False,
                                 "tensorrt_version": trt.__version__, "compute_capability": "8.9",
                                 "plan": write_plan(engine, job.key, "unet", plan), "size_bytes": len(plan),
                                 "onnx_sha256": m.component("unet")["sha256"], "refittable": refittable})

    add(refittable=False)
    with pytest.raises(UserError, match="--refittable"):
        TensorRTBackend().load(Manifest.load(engine), "unet", initializers=patched)
    add(refittable=True)
    session = TensorRTBackend().load(Manifest.load(engine), "unet", initializers=patched)
    (eng,) = session._engines.values()
    assert ("refit", sorted(patched)) in trt.log
    for name, value in patched.items():
        np.testing.assert_array_equal(np.asarray(eng.engine.plan["weights"][name], np.float32), value.ravel())
        assert not np.array_equal(value, stored[name].read())  # the LoRA changed it
    session.close()
