"""`sdrt export` on the tiny SD1- and SD2-style checkpoints: manifest, parity, refusals, atomicity."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, assert_one_line_error, run_cli

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")


def manifest(engine: Path) -> dict:
    return json.loads((engine / "sdrt.json").read_text())


def test_model_numbers_come_from_the_configs(sd1_engine, sd2_engine, sd1_model, sd2_model):
    for engine, model in ((sd1_engine, sd1_model), (sd2_engine, sd2_model)):
        m = manifest(engine)["model"]
        vae = json.loads((model / "vae" / "config.json").read_text())
        unet = json.loads((model / "unet" / "config.json").read_text())
        text = json.loads((model / "text_encoder" / "config.json").read_text())
        assert m["vae_scale_factor"] == 2 ** (len(vae["block_out_channels"]) - 1)
        assert m["scaling_factor"] == vae["scaling_factor"]
        assert m["latent_channels"] == vae["latent_channels"] == unet["in_channels"]
        assert m["default_height"] == unet["sample_size"] * m["vae_scale_factor"]
        assert m["text_hidden_size"] == text["hidden_size"]
        assert m["text_max_length"] == 77
    sd1, sd2 = manifest(sd1_engine)["model"], manifest(sd2_engine)["model"]
    # the two tiny models differ exactly where SD1 and SD2 differ (and the VAE block counts differ)
    assert (sd1["vae_scale_factor"], sd2["vae_scale_factor"]) == (2, 4)
    assert sd2["scaling_factor"] == pytest.approx(0.13025)
    assert (sd1["prediction_type"], sd2["prediction_type"]) == ("epsilon", "v_prediction")
    assert (sd1["pad_token"], sd2["pad_token"]) == ("<|endoftext|>", "!")
    assert (sd1["pad_token_id"], sd2["pad_token_id"]) == (49407, 0)
    assert (sd1["scheduler_class"], sd2["scheduler_class"]) == ("PNDMScheduler", "DDIMScheduler")


@pytest.mark.parametrize("kind", ["sd1-tiny", "sd2-tiny"])
def test_every_component_passes_parity_at_untraced_shapes(engine_dirs, kind):
    m = manifest(engine_dirs[kind])
    assert set(m["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    for name, c in m["components"].items():
        assert c["parity"]["rel_l2"] <= 1e-4, name
        assert c["parity"]["max_abs"] > 0, f"{name}: parity compared nothing"
    # parity ran at a batch and size other than the traced ones (batch 2, sample_size)
    unet_inputs = m["components"]["unet"]["parity"]["inputs"]["sample"]
    assert unet_inputs[0] != 2 and unet_inputs[2:] != [m["model"]["sample_size"]] * 2


@pytest.mark.parametrize("kind", ["sd1-tiny", "sd2-tiny"])
def test_graphs_have_the_contract_names_and_dynamic_axes(engine_dirs, kind):
    engine = engine_dirs[kind]
    m = manifest(engine)
    expected = {
        "text_encoder": (["input_ids"], ["last_hidden_state", "pooler_output"]),
        "unet": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
        "vae_decoder": (["latent_sample"], ["sample"]),
        "vae_encoder": (["sample"], ["latent_parameters"]),
    }
    for name, (ins, outs) in expected.items():
        c = m["components"][name]
        model = onnx.load(str(engine / c["file"]), load_external_data=False)
        assert [i.name for i in model.graph.input] == ins
        assert [o.name for o in model.graph.output] == outs
        assert [i["name"] for i in c["inputs"]] == ins
        first = model.graph.input[0].type.tensor_type.shape.dim
        assert first[0].dim_param == "batch", f"{name}: batch is not dynamic"
        if name != "text_encoder":
            assert first[2].dim_param and first[3].dim_param, f"{name}: height/width are not dynamic"
        files = [engine / c["file"]] + ([engine / name / c["data_file"]] if c["data_file"] else [])
        assert c["sha256"] and c["size_bytes"] == sum(f.stat().st_size for f in files), name
    # the UNet reads the text of any number of prompt chunks, and export checked it at two
    unet = onnx.load(str(engine / m["components"]["unet"]["file"]), load_external_data=False)
    text = unet.graph.input[2].type.tensor_type.shape.dim
    assert text[1].dim_param == "sequence" and text[2].dim_value == m["model"]["text_hidden_size"]
    checked = m["components"]["unet"]["parity"]["inputs"]["encoder_hidden_states"]
    assert checked[1] == 2 * m["model"]["text_max_length"]
    assert m["components"]["unet"]["variants"]["cpu"]["parity"]["inputs"]["encoder_hidden_states"] == checked


def test_manifest_records_tools_and_source(sd1_engine, sd1_model):
    m = manifest(sd1_engine)
    assert m["format"] == "sdrt-engine" and m["format_version"] == 1
    assert m["tools"]["torch"] == torch.__version__ and m["tools"]["opset"] == 17
    assert Path(m["source"]["path"]) == sd1_model.resolve()
    assert (sd1_engine / "tokenizer" / "tokenizer.json").is_file()
    assert (sd1_engine / "scheduler" / "scheduler_config.json").is_file()


def test_existing_engine_dir_is_refused_without_force_and_left_untouched(sd1_model, tmp_path):
    target = tmp_path / "engine"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    r = run_cli("export", sd1_model, target, "-q")
    assert r.returncode != 0
    assert "already exists" in r.stderr and "--force" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert (target / "keep.txt").read_text() == "mine"


def test_force_replaces_and_components_subset(sd1_model, tmp_path):
    target = tmp_path / "engine"
    target.mkdir()
    (target / "old.txt").write_text("old")
    r = run_cli("export", sd1_model, target, "--force", "-q", "--components", "text_encoder,vae_decoder")
    assert r.returncode == 0, r.stderr
    assert not (target / "old.txt").exists()
    assert set(manifest(target)["components"]) == {"text_encoder", "vae_decoder"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"


def test_missing_component_is_named(sd1_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(sd1_model, model)
    shutil.rmtree(model / "unet")
    assert_one_line_error(run_cli("export", model, tmp_path / "e"), "unet", "missing")
    assert not (tmp_path / "e").exists()


def test_an_sdxl_index_without_its_second_encoder_is_named(sd1_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(sd1_model, model)
    index = json.loads((model / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (model / "model_index.json").write_text(json.dumps(index))
    assert_one_line_error(run_cli("export", model, tmp_path / "e"), "missing", "text_encoder_2, tokenizer_2")


def test_unsupported_pipelines_and_unets_are_named(sd1_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(sd1_model, model)
    index_path = model / "model_index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps(dict(index, _class_name="StableDiffusionUpscalePipeline")))
    assert_one_line_error(run_cli("export", model, tmp_path / "e"), "StableDiffusionUpscalePipeline", "supported:")
    index_path.write_text(json.dumps(index))
    unet = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps(dict(unet, in_channels=7)))
    assert_one_line_error(run_cli("export", model, tmp_path / "e"), "in_channels=7",
                          "supported are 4 (txt2img, img2img) and 9 (inpainting")
    (model / "unet" / "config.json").write_text(json.dumps(dict(unet, addition_embed_type="text_time")))
    assert_one_line_error(run_cli("export", model, tmp_path / "e"), "addition_embed_type='text_time'")


def test_not_a_checkpoint_and_bad_flags(tmp_path):
    assert_one_line_error(run_cli("export", tmp_path / "nope", tmp_path / "e"), "does not exist")
    assert_one_line_error(run_cli("export", tmp_path, tmp_path / "e"), "model_index.json")


def test_pickle_weights_need_the_explicit_flag(sd1_model, tmp_path):
    from diffusers import AutoencoderKL

    model = tmp_path / "model"
    shutil.copytree(sd1_model, model)
    vae = AutoencoderKL.from_pretrained(model / "vae")
    shutil.rmtree(model / "vae")
    vae.save_pretrained(model / "vae", safe_serialization=False)
    assert (model / "vae" / "diffusion_pytorch_model.bin").is_file()
    assert_one_line_error(run_cli("export", model, tmp_path / "e", "-q"), "pickle", "--allow-pickle")
    assert not (tmp_path / "e").exists()
    r = run_cli("export", model, tmp_path / "e", "-q", "--allow-pickle", "--components", "vae_decoder")
    assert r.returncode == 0, r.stderr
    assert manifest(tmp_path / "e")["components"]["vae_decoder"]["parity"]["rel_l2"] <= 1e-4


# `sdrt export` in a child process that stops, and says so, right after the first graph was written into its
# temporary directory: the test stops it there, whatever this machine's speed
_PAUSED_EXPORT = """
import sys, time
import sdrt.export.exporter as exporter
written = exporter._entry
def entry_then_pause(*args, **kwargs):
    entry = written(*args, **kwargs)
    print("paused after " + args[0], flush=True)
    time.sleep(600)
    return entry
exporter._entry = entry_then_pause
from sdrt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start_export_and_wait_for_its_temporary(model: Path, target: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED_EXPORT, "export", str(model), str(target), "-q"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()   # blocks until the first graph is written, or the export fails
    assert line.startswith("paused after "), proc.communicate(timeout=60)[1]
    tmps = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.tmp")]
    assert tmps and (tmps[0] / line.split()[-1]).is_dir()
    return proc


def test_export_stopped_with_sigterm_leaves_nothing(sd1_model, tmp_path):
    """`timeout` and service managers stop with SIGTERM: cleaned up as Ctrl-C is, one line, exit 128+15."""
    target = tmp_path / "engine"
    proc = _start_export_and_wait_for_its_temporary(sd1_model, target)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "sdrt export: terminated" and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_export_killed_midway_leaves_no_engine_dir_and_a_later_export_removes_its_temporary(sd1_model, tmp_path):
    target = tmp_path / "engine"
    proc = _start_export_and_wait_for_its_temporary(sd1_model, target)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()  # the half-written engine never stands at ENGINE_DIR
    killed = tmp_path / f".engine.tmp-{proc.pid}"
    assert killed.is_dir()  # SIGKILL cannot be handled: the debris stays, until the next export
    running = tmp_path / f".engine.tmp-{os.getpid()}"  # a process that still runs: another export's, kept
    running.mkdir()
    other = tmp_path / f".engine2.tmp-{proc.pid}"  # another engine directory's, kept
    other.mkdir()
    r = run_cli("export", sd1_model, target, "-q", "--components", "text_encoder")
    assert r.returncode == 0, r.stderr
    assert f"removed {killed}" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["engine", running.name, other.name])


def test_parity_gate_names_the_component(tmp_path):
    from sdrt.export.parity import ParityError, check_parity

    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    path = tmp_path / "m.onnx"
    torch.onnx.export(a, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    ok = check_parity("linear", path, a, {"x": x}, ["y"])
    assert ok["rel_l2"] < 1e-6
    with pytest.raises(ParityError, match="linear.*relative L2"):
        check_parity("linear", path, b, {"x": x}, ["y"])


def test_big_graphs_keep_weights_in_one_external_file(monkeypatch, tmp_path):
    from sdrt.export import graphs

    monkeypatch.setattr(graphs, "EXTERNAL_DATA_THRESHOLD", 0)
    net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])
    spec = graphs.GraphSpec("toy", lambda m: net, inputs=(("x", "float32", ("batch", 64)),),
                            outputs=(("y", "float32", ("batch", 64)),))
    graph, data = graphs.export_graph(spec, net, {"x": torch.randn(2, 64)}, tmp_path / "toy", 17)
    assert data == "model.onnx.data"
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == ["model.onnx", "model.onnx.data"]
    assert graph.stat().st_size < 64 * 64 * 4, "weights were left inside the graph"
    s = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 64), dtype=np.float32)
    np.testing.assert_allclose(s.run(None, {"x": x})[0], net(torch.from_numpy(x)).detach().numpy(), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("kind", ["sd1-tiny", "sd2-tiny"])
def test_unet_has_a_fused_attention_variant_over_the_same_weights(engine_dirs, kind):
    engine = engine_dirs[kind]
    unet = manifest(engine)["components"]["unet"]
    variant = unet["variants"]["cpu"]
    fused = onnx.load(str(engine / variant["file"]), load_external_data=False)
    plain = onnx.load(str(engine / unet["file"]), load_external_data=False)
    ops_fused = {(n.domain, n.op_type) for n in fused.graph.node}
    ops_plain = {(n.domain, n.op_type) for n in plain.graph.node}
    assert ("com.microsoft", "MultiHeadAttention") in ops_fused
    assert not any(d == "com.microsoft" for d, _ in ops_plain), "the portable graph must use standard ops only"
    assert ("", "Softmax") in ops_plain
    assert variant["parity"]["rel_l2"] <= 1e-4 and unet["parity"]["rel_l2"] <= 1e-4
    # same weights: identical initializer names and contents
    assert [t.name for t in fused.graph.initializer] == [t.name for t in plain.graph.initializer]
    feeds = {"sample": np.random.default_rng(0).standard_normal((2, 4, 6, 10), dtype=np.float32),
             "timestep": np.array([10.0, 900.0], np.float32),
             "encoder_hidden_states": np.random.default_rng(1).standard_normal(
                 (2, 77, manifest(engine)["model"]["text_hidden_size"]), dtype=np.float32)}
    a, b = (ort.InferenceSession(str(engine / f), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for f in (variant["file"], unet["file"]))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd1-tiny", "sd2-tiny"])
@pytest.mark.parametrize("comp", ["vae_decoder", "vae_encoder"])
def test_vae_has_a_layernorm_variant_over_the_same_weights(engine_dirs, kind, comp):
    engine = engine_dirs[kind]
    entry = manifest(engine)["components"][comp]
    variant = entry["variants"]["cpu"]
    assert entry["data_file"] == "model.onnx.data", "the two graphs share one weights file"
    assert variant["min_onnxruntime"] == "1.24" and variant["parity"]["rel_l2"] <= 1e-4
    fast = onnx.load(str(engine / variant["file"]), load_external_data=False)
    plain = onnx.load(str(engine / entry["file"]), load_external_data=False)
    ops_fast = [n.op_type for n in fast.graph.node]
    ops_plain = [n.op_type for n in plain.graph.node]
    assert "InstanceNormalization" not in ops_fast
    assert ops_fast.count("LayerNormalization") == variant["groupnorms"] == ops_plain.count("InstanceNormalization")
    assert [t.name for t in fast.graph.initializer] == [t.name for t in plain.graph.initializer]
    m = manifest(engine)["model"]
    f = m["vae_scale_factor"]
    name = entry["inputs"][0]["name"]
    shape = (2, m["latent_channels"], 5, 7) if comp == "vae_decoder" else (2, m["image_channels"], 5 * f, 7 * f)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    a, b = (ort.InferenceSession(str(engine / g), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
            for g in (variant["file"], entry["file"]))
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5


def test_cpu_backend_runs_the_variants_where_its_onnxruntime_can(sd1_engine, monkeypatch):
    from sdrt.runtime.backends import onnxruntime as backend
    from sdrt.runtime.manifest import Manifest

    m = Manifest.load(sd1_engine)
    cpu = backend.OnnxRuntimeBackend("cpu", threads=1)
    assert cpu.load(m, "vae_decoder").path.name == "model.ort.onnx"
    assert cpu.load(m, "text_encoder").path.name == "model.onnx"  # no variant
    monkeypatch.setattr(ort, "__version__", "1.23.2")  # before LayerNormalization broadcast its scale
    assert cpu.load(m, "vae_decoder").path.name == "model.onnx"
    assert cpu.load(m, "unet").path.name == "model.ort.onnx"  # fused attention has no such floor
    assert backend.runs_variant("1.24.0", {"min_onnxruntime": "1.24"})
    assert backend.runs_variant("1.24.0.dev20260101+cpu", {"min_onnxruntime": "1.24"})
    assert not backend.runs_variant("1.9.0", {"min_onnxruntime": "1.24"})


def test_expand_attention_is_the_contrib_op_in_standard_ops(tmp_path):
    """One MultiHeadAttention node, expanded, computes what ONNX Runtime's kernel computes."""
    from onnx import TensorProto, helper, numpy_helper

    from sdrt.export.attention import expand_attention

    rng = np.random.default_rng(0)
    heads, inner = 4, 32
    wq, wk, wv = (numpy_helper.from_array(rng.standard_normal((inner, inner), dtype=np.float32), n)
                  for n in ("wq", "wk", "wv"))
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["c", "wk"], ["k"]),
             helper.make_node("MatMul", ["c", "wv"], ["v"]),
             helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=heads)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", inner]),
                                           helper.make_tensor_value_info("c", TensorProto.FLOAT, ["b", "t", inner])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", inner])], [wq, wk, wv])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    feeds = {"x": rng.standard_normal((2, 9, inner), dtype=np.float32),
             "c": rng.standard_normal((2, 5, inner), dtype=np.float32)}
    fused = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert expand_attention(model) == 1
    assert {n.op_type for n in model.graph.node} >= {"Softmax", "MatMul", "Transpose"}
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(plain, fused, rtol=1e-5, atol=1e-5)


def test_engine_dir_may_not_be_or_contain_the_checkpoint(sd1_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(sd1_model, model)
    assert_one_line_error(run_cli("export", model, model, "--force", "-q"), "is or contains MODEL_DIR")
    assert_one_line_error(run_cli("export", model, tmp_path, "--force", "-q"), "is or contains MODEL_DIR")
    assert (model / "model_index.json").is_file()


def test_a_variant_only_weights_file_is_one_line(sd1_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(sd1_model, model)
    vae = model / "vae" / "diffusion_pytorch_model.safetensors"
    vae.rename(vae.with_name("diffusion_pytorch_model.fp16.safetensors"))
    r = run_cli("export", model, tmp_path / "e", "-q")
    # the graphs exported before the failure were logged; the error itself is the last line, without traceback
    assert r.returncode != 0 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "vae" in last and "could not load" in last, last
    assert not (tmp_path / "e").exists()


def test_engine_dir_files_get_the_usual_mode(sd1_engine):
    """Not owner-only (mkstemp's and onnx's external-data default): a deployed engine directory is often read
    by another user than the one who exported it."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    files = [sd1_engine / "sdrt.json"] + sorted(sd1_engine.glob("*/model.onnx.data"))
    assert len(files) >= 3
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    from sdrt.runtime.manifest import write_text_atomic

    target = tmp_path / "report.md"
    target.write_text("old")
    target.chmod(0o640)
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_weights_the_tracer_scattered_are_gathered_into_one_aligned_file(tmp_path):
    """A model over 2 GiB comes out of the tracer as one file per tensor; they are streamed into one data file
    (each tensor page-aligned), without loading the model's weights, and the graph computes the same."""
    from onnx import numpy_helper

    from sdrt.export import graphs

    net = torch.nn.Sequential(*[torch.nn.Linear(64, 48 + 16 * i) if i == 0 else
                                torch.nn.Linear(48 + 16 * (i - 1), 48 + 16 * i) for i in range(4)])
    scratch = tmp_path / ".trace"
    scratch.mkdir()
    traced = scratch / "model.onnx"
    torch.onnx.export(net, (torch.randn(2, 64),), str(traced), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b"}})
    m = onnx.load(str(traced))
    onnx.save_model(m, str(traced), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    scattered = [p.name for p in scratch.iterdir() if p.name != "model.onnx"]
    assert len(scattered) >= 8, scattered  # the tracer's layout: a file per tensor
    data = graphs.gather_weights(traced, tmp_path / "model.onnx")
    assert data == graphs.DATA_FILE
    shutil.rmtree(scratch)
    out = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    offsets = [int({e.key: e.value for e in t.external_data}["offset"]) for t in out.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(offsets) >= 8 and all(o % graphs.ALIGNMENT == 0 for o in offsets)
    loaded = onnx.load(str(tmp_path / "model.onnx"))
    params = dict(net.named_parameters())
    matched = [t for t in loaded.graph.initializer if t.name in params]
    assert len(matched) == len(params)
    for t in matched:  # every weight's bytes, as torch had them
        np.testing.assert_array_equal(numpy_helper.to_array(t), params[t.name].detach().numpy())
    x = np.random.default_rng(0).standard_normal((3, 64), dtype=np.float32)
    s = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(s.run(None, {"x": x})[0], net(torch.from_numpy(x)).detach().numpy(), rtol=1e-5,
                               atol=1e-6)


def test_a_truncated_scattered_weight_is_refused(tmp_path):
    from sdrt.export import graphs

    net = torch.nn.Linear(64, 64)
    traced = tmp_path / ".trace" / "model.onnx"
    traced.parent.mkdir()
    torch.onnx.export(net, (torch.randn(2, 64),), str(traced), dynamo=False)
    onnx.save_model(onnx.load(str(traced)), str(traced), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    biggest = max((p for p in traced.parent.iterdir() if p.name != "model.onnx"), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100])
    with pytest.raises(ValueError, match="shorter than"):
        graphs.gather_weights(traced, tmp_path / "model.onnx")
    assert not list(tmp_path.glob("*.part-*")) and not (tmp_path / graphs.DATA_FILE).exists()
