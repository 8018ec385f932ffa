import argparse
import json
import sys

import numpy as np
import onnxruntime as ort
import pytest

from sdrt.engines import build as build_mod
from sdrt.engines.build import build_engines, plan_jobs, record_entry, resolve_components, write_plan
from sdrt.engines.cli import add_build_arguments, run_build
from sdrt.engines.parity import check_engine, compare, psnr, random_feeds
from sdrt.engines.profiles import make_request
from sdrt.errors import MissingDependencyError, UserError
from sdrt.runtime.manifest import Manifest
from tests.engines.fake_engine_dir import make_engine_dir


@pytest.fixture
def engine_dir(tmp_path):
    return make_engine_dir(tmp_path / "engine")


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_jobs_cover_components_with_distinct_keys(engine_dir):
    m = Manifest.load(engine_dir)
    req = make_request(m.data["model"], batch="1:1:2")
    jobs = plan_jobs(m, req, "fp16", resolve_components(m, None), "10.3.0", "8.9")
    assert [j.component for j in jobs] == ["text_encoder", "unet", "vae_decoder"]
    assert len({j.key for j in jobs}) == 3 and not any(j.cached for j in jobs)
    assert jobs[1].tiers[-1] == ("fp32", "all") and jobs[1].tiers[0] == ("fp16", "none")


def test_force_upcast_vae_starts_in_fp32(engine_dir):
    m = Manifest.load(engine_dir)
    m.data["model"].update(force_upcast=True, family="sdxl")
    (job,) = plan_jobs(m, make_request(m.data["model"]), "fp16", ["vae_decoder"], "10.3.0", "8.9")
    assert job.tiers == (("fp32", "all"),) and job.precision == "fp16"
    assert "force_upcast" in job.fp32_reason and "fp16-safe VAE" in job.fp32_reason
    # an fp16-safe VAE (force_upcast: false) goes through the fp16 tiers; SD1/SD2 pipelines ignore the flag
    for model in (dict(force_upcast=False, family="sdxl"), dict(force_upcast=True, family="sd")):
        m.data["model"].update(model)
        (job,) = plan_jobs(m, make_request(m.data["model"]), "fp16", ["vae_decoder"], "10.3.0", "8.9")
        assert job.tiers[0] == ("fp16", "none") and job.fp32_reason is None, model


def test_sdxl_profiles_cover_the_second_encoder_and_the_added_conditioning():
    from sdrt.engines.profiles import component_profiles

    model = {"vae_scale_factor": 8, "size_multiple": 8, "default_height": 1024, "default_width": 1024,
             "text_max_length": 77}
    req = make_request(model, batch="1:1:2")
    (enc2,) = component_profiles("text_encoder_2", [{"name": "input_ids", "shape": ["batch", 77]}], model, req)
    # prompts and negatives, each as up to 3 prompt chunks (the default --prompt-chunks 1:1:3)
    assert enc2["input_ids"] == {"min": [1, 77], "opt": [1, 77], "max": [12, 77]}
    unet_inputs = [{"name": n, "dtype": "float32", "shape": s} for n, s in (
        ("sample", ["batch", 4, "latent_height", "latent_width"]), ("text_embeds", ["batch", 1280]),
        ("time_ids", ["batch", 6]), ("timestep_cond", ["batch", 256]))]
    (unet,) = component_profiles("unet", unet_inputs, model, req)
    assert unet["text_embeds"] == {"min": [1, 1280], "opt": [2, 1280], "max": [4, 1280]}
    assert unet["time_ids"]["max"] == [4, 6] and unet["timestep_cond"]["opt"] == [2, 256]
    assert unet["sample"]["max"] == [4, 4, 256, 256]
    feeds = random_feeds(unet_inputs, {n: s["max"] for n, s in unet.items()}, model)
    assert feeds["time_ids"].min() >= 0 and feeds["time_ids"].max() > 100  # pixel sizes, not N(0, 1)


def test_unknown_component_is_refused(engine_dir):
    with pytest.raises(UserError, match="vae_encoder not in .* it has text_encoder, unet, vae_decoder"):
        resolve_components(Manifest.load(engine_dir), ["unet", "vae_encoder"])


def test_written_plan_and_entry_make_the_job_cached(engine_dir):
    m = Manifest.load(engine_dir)
    req = make_request(m.data["model"])
    (job,) = plan_jobs(m, req, "fp16", ["unet"], "10.3.0", "8.9")
    rel = write_plan(engine_dir, job.key, "unet", b"PLAN", info={"key": job.key})
    assert rel == f"trt/{job.key}/unet.plan" and (engine_dir / rel).read_bytes() == b"PLAN"
    assert not [p for p in (engine_dir / "trt").iterdir() if p.name.startswith(".tmp")]
    entry = {"key": job.key, "precision": "fp16", "profiles": job.profiles, "tensorrt_version": "10.3.0",
             "compute_capability": "8.9", "gpu_name": "L4", "plan": rel, "size_bytes": 4,
             "onnx_sha256": m.component("unet")["sha256"], "fallback_fp32": False}
    record_entry(m, "unet", entry)
    reloaded = Manifest.load(engine_dir)
    assert reloaded.data["engines"]["unet"] == [entry]
    (again,) = plan_jobs(reloaded, req, "fp16", ["unet"], "10.3.0", "8.9")
    assert again.cached
    (other,) = plan_jobs(reloaded, req, "fp16", ["unet"], "10.4.0", "8.9")
    assert not other.cached


def test_record_entry_drops_entries_of_an_older_graph(engine_dir):
    m = Manifest.load(engine_dir)
    old_dir = engine_dir / "trt" / "old"
    old_dir.mkdir(parents=True)
    m.data["engines"] = {"unet": [{"key": "old", "onnx_sha256": "0" * 64}, {"key": "other", "onnx_sha256": None}]}
    record_entry(m, "unet", {"key": "new", "onnx_sha256": m.component("unet")["sha256"]})
    assert [e["key"] for e in json.loads((engine_dir / "sdrt.json").read_text())["engines"]["unet"]] == ["other", "new"]
    assert not old_dir.exists()


def test_build_without_tensorrt_names_the_gpu_extra(engine_dir, no_tensorrt):
    with pytest.raises(MissingDependencyError, match=r"tensorrt is not installed .*pip install 'sdrt\[gpu\]'"):
        build_engines(engine_dir)


def test_bad_options_are_reported_before_missing_dependencies(engine_dir, no_tensorrt):
    with pytest.raises(UserError, match="--precision 'int8'"):
        build_engines(engine_dir, precision="int8")
    with pytest.raises(UserError, match="--height 40:40:40: 40 is not a multiple of 16"):
        build_engines(engine_dir, height=(40, 40, 40))
    with pytest.raises(UserError, match="--opt-level 9"):
        build_engines(engine_dir, opt_level=9)
    with pytest.raises(UserError, match="does not exist"):
        build_engines(engine_dir / "nope")


def test_cli_arguments_and_run_build(engine_dir, no_tensorrt):
    parser = argparse.ArgumentParser()
    add_build_arguments(parser)
    args = parser.parse_args([str(engine_dir), "--batch", "1:2:4", "--height", "32:64:128", "--static",
                              "--timing-cache", "t.cache", "--components", "unet"])
    assert args.static and args.precision == "fp16" and args.opt_level == 3 and not args.refittable
    assert parser.parse_args([str(engine_dir), "--refittable"]).refittable
    with pytest.raises(MissingDependencyError, match="gpu"):
        run_build(args)
    with pytest.raises(UserError, match="--batch '1:x'"):
        run_build(parser.parse_args([str(engine_dir), "--batch", "1:x"]))


def test_add_subcommand_wires_sdrt_build(engine_dir):
    from sdrt.engines.cli import add_subcommand

    parser = argparse.ArgumentParser(prog="sdrt")
    add_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["build", str(engine_dir), "--precision", "fp32", "--width", "32:64:64"])
    assert args.func is run_build and args.width == "32:64:64" and args.precision == "fp32"


def test_compare_refuses_nan_inf_and_gross_error():
    ref = {"y": np.ones((2, 3), np.float32)}
    assert compare("unet", {"y": ref["y"] + 1e-4}, ref).ok
    bad = ref["y"].copy()
    bad[0, 0] = np.nan
    v = compare("unet", {"y": bad}, ref)
    assert not v.ok and "NaN/inf" in v.reason
    v = compare("unet", {"y": np.full((2, 3), np.inf, np.float32)}, ref)
    assert not v.ok
    v = compare("unet", {"y": ref["y"] * 1.5}, ref)
    assert not v.ok and "exceeds" in v.reason and v.rel_l2 == pytest.approx(0.5)


def test_random_feeds_respect_dtypes_and_ranges(engine_dir):
    m = Manifest.load(engine_dir)
    feeds = random_feeds(m.component("text_encoder")["inputs"], {"input_ids": [2, 8]}, m.data["model"])
    assert feeds["input_ids"].dtype == np.int64 and feeds["input_ids"].max() < 256
    feeds = random_feeds(m.component("unet")["inputs"],
                         {"sample": [2, 4, 8, 8], "timestep": [2], "encoder_hidden_states": [2, 8, 16]},
                         m.data["model"])
    assert feeds["timestep"].dtype == np.float32 and 0 <= feeds["timestep"].min() < 1000


def _ort(engine_dir, component):
    sess = ort.InferenceSession(str(engine_dir / component / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return lambda feeds: dict(zip(names, sess.run(None, dict(feeds))))


def test_check_engine_against_onnxruntime(engine_dir):
    """The fp16 gate on CPU: an fp16-rounded 'engine' passes; one that overflows is refused."""
    m = Manifest.load(engine_dir)
    req = make_request(m.data["model"], batch="1:1:2", static=True)
    (job,) = plan_jobs(m, req, "fp16", ["unet"], "10.3.0", "8.9")
    reference = _ort(engine_dir, "unet")

    def fp16_engine(feeds):
        out = reference({k: (v.astype(np.float16).astype(np.float32) if v.dtype == np.float32 else v)
                         for k, v in feeds.items()})
        return {k: v.astype(np.float16).astype(np.float32) for k, v in out.items()}

    spec = m.component("unet")
    v = check_engine("unet", spec["inputs"], job.profiles, m.data["model"], fp16_engine, reference)
    assert v.ok and 0 < v.rel_l2 < 1e-2

    def overflowing_engine(feeds):
        with np.errstate(over="ignore"):
            return {k: (v * 1e5).astype(np.float16).astype(np.float32) for k, v in reference(feeds).items()}

    v = check_engine("unet", spec["inputs"], job.profiles, m.data["model"], overflowing_engine, reference)
    assert not v.ok and "NaN/inf" in v.reason


@pytest.mark.parametrize("refittable", [False, True])
def test_build_uses_fp32_fallback_when_fp16_tiers_fail(engine_dir, monkeypatch, refittable):
    """The build loop with TensorRT replaced: fp16 tiers produce inf, fp32 passes -> fallback_fp32 entry.
    A refittable build passes the flag to every tier and keeps the graph unfolded (weights keep their names)."""
    import types

    fake_trt = types.SimpleNamespace(__version__="10.3.0")
    monkeypatch.setattr(build_mod, "_import_build_deps", lambda: (fake_trt, None))
    folds = []
    monkeypatch.setattr(build_mod, "prepare_onnx", lambda src, dst, external_data, fold: folds.append(fold) or src)
    from sdrt.runtime.backends import cuda as cuda_mod
    monkeypatch.setattr(cuda_mod, "device_info", lambda device=0: ("Fake GPU", "8.9"))
    built = []

    def fake_build_plan(trt, pg, onnx_path, profiles, precision, fp32_layers, timing_cache, opt_level, refit):
        assert refit is refittable
        built.append((precision, fp32_layers))
        return f"{precision}/{fp32_layers}".encode()

    monkeypatch.setattr(build_mod, "build_plan", fake_build_plan)

    class FakeSession:
        def __init__(self, plan):
            self.fp16 = plan.startswith(b"fp16")
            self.ref = _ort(engine_dir, "vae_decoder")

        def run(self, feeds):
            out = self.ref(feeds)
            return {k: v * np.inf for k, v in out.items()} if self.fp16 else out

        def close(self):
            pass

    monkeypatch.setattr(build_mod, "_engine_runner",
                        lambda trt, comp, spec, d, name, profiles: FakeSession((d / name).read_bytes()))
    logs = []
    (entry,) = build_engines(engine_dir, batch=(1, 1, 1), height=(32, 32, 32), width=(32, 32, 32),
                             components=["vae_decoder"], refittable=refittable, log=logs.append)
    assert folds == [not refittable] and entry["refittable"] is refittable
    assert built == [("fp16", "none"), ("fp16", "sensitive"), ("fp32", "all")]
    assert entry["fallback_fp32"] and entry["precision"] == "fp16" and entry["parity"]["rel_l2"] == 0.0
    assert (engine_dir / entry["plan"]).read_bytes() == b"fp32/all"
    assert Manifest.load(engine_dir).data["engines"]["vae_decoder"][0]["key"] == entry["key"]
    assert any("refused fp16/none" in line for line in logs)
    # Same request again: reused, not rebuilt.
    built.clear()
    build_engines(engine_dir, batch=(1, 1, 1), height=(32, 32, 32), width=(32, 32, 32),
                  components=["vae_decoder"], refittable=refittable, log=logs.append)
    assert built == [] and logs[-1].startswith("vae_decoder: cached engine")


def test_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 1) == pytest.approx(48.13, abs=0.01)


def test_build_plan_passes_loaders_polygraphy_arguments(tmp_path):
    """build_plan against a stand-in for polygraphy.backend.trt that calls as the real one does:
    PostprocessNetwork calls ``func(network=network)``; CreateConfig/Profile take these keywords."""
    import types

    calls = {}

    class Profile(dict):
        def add(self, name, min, opt, max):
            self[name] = (min, opt, max)
            return self

    class Layer:
        def __init__(self, kind):
            self.type, self.num_outputs, self.precision, self.out = kind, 1, None, {}

        def set_output_type(self, i, dtype):
            self.out[i] = dtype

    network_obj = [Layer("SOFTMAX"), Layer("CONV")]

    def postprocess(network, func, name=None):
        return lambda: (func(network=network_obj), network_obj)[1]

    def create_config(fp16=None, profiles=None, precision_constraints=None, load_timing_cache=None,
                      builder_optimization_level=None, refittable=False):
        calls["config"] = dict(fp16=fp16, profiles=profiles, precision_constraints=precision_constraints,
                               load_timing_cache=load_timing_cache, level=builder_optimization_level,
                               refittable=refittable)
        return "config"

    def engine_bytes(network, config=None, save_timing_cache=None):
        calls["network"] = network() if callable(network) else network
        return lambda: b"plan"

    pg = types.SimpleNamespace(NetworkFromOnnxPath=lambda path: "parsed", PostprocessNetwork=postprocess,
                               Profile=Profile, CreateConfig=create_config, EngineBytesFromNetwork=engine_bytes)
    trt = types.SimpleNamespace(LayerType=types.SimpleNamespace(SOFTMAX="SOFTMAX"), float32="fp32")
    profiles = [{"sample": {"min": [1, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [4, 4, 8, 8]}}]
    plan = build_mod.build_plan(trt, pg, tmp_path / "m.onnx", profiles, "fp16", "sensitive", None, 3, True)
    assert plan == b"plan"
    assert network_obj[0].precision == "fp32" and network_obj[0].out == {0: "fp32"}
    assert network_obj[1].precision is None
    assert calls["config"]["precision_constraints"] == "prefer" and calls["config"]["fp16"] is True
    assert calls["config"]["refittable"] is True
    assert calls["config"]["profiles"][0]["sample"] == ([1, 4, 8, 8], [2, 4, 8, 8], [4, 4, 8, 8])
