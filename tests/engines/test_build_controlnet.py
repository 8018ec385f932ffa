"""`sdrt build` on an engine with a ControlNet and a T2I-Adapter (`sdrt export --controlnet`, sd1-tiny): the
profiles of controlnet/NAME, unet_control and unet_adapter, computed from the real manifest and checked against
the shapes its ONNX graphs compute (ONNX Runtime, CPU); which plans a build makes, with TensorRT and its loaders
replaced by stand-ins; the missing-TensorRT line. The GPU test skips with a reason."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from sdrt.engines import build as build_mod
from sdrt.engines.build import build_engines, plan_jobs, record_entry, resolve_components
from sdrt.engines.parity import random_feeds
from sdrt.engines.profiles import make_request, profile_fits
from sdrt.errors import UserError
from sdrt.runtime.manifest import Manifest
from tests.conftest import assert_one_line_error, run_cli

torch = pytest.importorskip("torch")   # the export

# odd latent sizes (sd1-tiny: vae_scale_factor 2): each level's residual is the latent halved, rounding up
HEIGHT, WIDTH = (18, 34, 66), (22, 30, 46)
CONTROLS = ["controlnet/canny", "controlnet/sketch", "unet_control", "unet_adapter"]
BOUNDS = ("min", "opt", "max")


@pytest.fixture(scope="module")
def control_engine(sd1_model, tmp_path_factory):
    """sd1-tiny exported with a ControlNet (canny) and a T2I-Adapter (sketch); read-only: copy to change it."""
    from sdrt.export import export_model
    from tools.make_models import make_controlnet, make_t2i_adapter

    base = tmp_path_factory.mktemp("trt-controls")
    cn, adapter = make_controlnet(sd1_model, base / "cn", seed=1), make_t2i_adapter(sd1_model, base / "ad", seed=2)
    engine = base / "engine"
    export_model(sd1_model, engine, progress=False, components="text_encoder,unet,vae_decoder",
                 controlnets=[f"{cn}:canny", f"{adapter}:sketch"], log=lambda m: None)
    return engine


@pytest.fixture
def engine_copy(control_engine, tmp_path):
    return shutil.copytree(control_engine, tmp_path / "engine")


def _profiles(manifest, batch="1:1:2", static=False, height=HEIGHT, width=WIDTH):
    req = make_request(manifest.data["model"], batch=batch, height=height, width=width, static=static)
    jobs = plan_jobs(manifest, req, "fp16", ["unet", *CONTROLS], "10.3.0", "8.9")
    return {j.component: j.profiles for j in jobs}


def _run(manifest, component, shapes, seed=0):
    """The component's ONNX graph under ONNX Runtime (CPU) on random inputs of ``shapes``."""
    spec = manifest.component(component)
    sess = ort.InferenceSession(str(manifest.engine_dir / spec["file"]), providers=["CPUExecutionProvider"])
    feeds = random_feeds(spec["inputs"], shapes, manifest.data["model"], seed)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def test_profiles_follow_the_unet_and_the_down_blocks(control_engine):
    m = Manifest.load(control_engine)
    p = _profiles(m)
    (unet,), (cn,), (ad,), (ctrl,), (uad,) = (p[c] for c in ("unet", *CONTROLS))
    # the UNet's batch (guided 2 x 2, unguided and guess mode 1) and sizes: latents 9:17:33 x 11:15:23
    for graph in (cn, ctrl, uad):
        for name in ("sample", "timestep", "encoder_hidden_states"):
            assert graph[name] == unet[name], name
    assert unet["sample"] == {"min": [1, 4, 9, 11], "opt": [2, 4, 17, 15], "max": [4, 4, 33, 23]}
    assert cn["controlnet_cond"] == {"min": [1, 3, 18, 22], "opt": [2, 3, 34, 30], "max": [4, 3, 66, 46]}
    # level 1: the latent halved, rounding up (9 -> 5, 17 -> 9, 33 -> 17; 11 -> 6, 15 -> 8, 23 -> 12)
    assert ctrl["down_residual_2"] == {"min": [1, 32, 5, 6], "opt": [2, 32, 9, 8], "max": [4, 32, 17, 12]}
    assert ctrl["down_residual_0"]["max"] == [4, 32, 33, 23] and ctrl["mid_residual"]["min"] == [1, 64, 5, 6]
    # the adapter: one picture per request
    assert ad["controlnet_cond"] == {"min": [1, 3, 18, 22], "opt": [1, 3, 34, 30], "max": [1, 3, 66, 46]}
    assert uad["adapter_feature_1"] == {"min": [1, 64, 5, 6], "opt": [2, 64, 9, 8], "max": [4, 64, 17, 12]}


def test_controlnet_outputs_are_what_unet_control_takes_at_every_bound(control_engine):
    """What the graphs compute at each profile bound: the ControlNet's outputs have exactly the shapes unet_control's
    profile gives its residual inputs (the adapter's, unet_adapter's, but for the batch), and unet_control runs on
    them."""
    m = Manifest.load(control_engine)
    p = _profiles(m)
    for bound in BOUNDS:
        shapes = {n: s[bound] for n, s in p["controlnet/canny"][0].items()}
        residuals = _run(m, "controlnet/canny", shapes)
        ctrl = p["unet_control"][0]
        assert {n: list(a.shape) for n, a in residuals.items()} == \
            {n: ctrl[n][bound] for n in m.data["controlnets"]["canny"]["residuals"]}, bound
        out = _run(m, "unet_control", {n: s[bound] for n, s in ctrl.items()})["out_sample"]
        assert list(out.shape) == ctrl["sample"][bound]
        features = _run(m, "controlnet/sketch", {n: s[bound] for n, s in p["controlnet/sketch"][0].items()})
        uad = p["unet_adapter"][0]
        assert {n: list(a.shape[1:]) for n, a in features.items()} == \
            {n: uad[n][bound][1:] for n in m.data["controlnets"]["sketch"]["residuals"]}, bound
        assert _run(m, "unet_adapter", {n: s[bound] for n, s in uad.items()})["out_sample"].shape[2:] == \
            tuple(uad["sample"][bound][2:])


def test_guess_mode_and_static_batches(control_engine):
    """A ControlNet sees the conditional half alone in guess mode: its batch minimum is the image batch's."""
    m = Manifest.load(control_engine)
    (cn,) = _profiles(m, batch="2:2:4")["controlnet/canny"]
    assert [cn["sample"][k][0] for k in BOUNDS] == [2, 4, 8]
    one = {n: [cn[n]["opt"][0] // 2, *cn[n]["opt"][1:]] for n in cn}   # guess mode: the conditional half, 2 rows
    assert profile_fits(cn, one) and profile_fits(cn, {n: s["opt"] for n, s in cn.items()})
    p = _profiles(m, batch="2", static=True, height=(34,) * 3, width=(30,) * 3)
    for comp in ("controlnet/canny", "unet_control", "unet_adapter"):
        assert [q["sample"]["opt"][0] for q in p[comp]] == [2, 4], comp   # unguided or guess mode; guided
    assert [q["controlnet_cond"]["opt"] for q in p["controlnet/sketch"]] == [[1, 3, 34, 30]]


def test_a_control_image_multiple_rounds_its_sizes_inward(control_engine):
    """A T2I-Adapter whose pixel unshuffle wants sizes of a larger multiple than the VAE's gets the request's sizes
    rounded inward to it; a range holding none is one line."""
    m = Manifest.load(control_engine)
    m.data["controlnets"]["sketch"]["image_multiple"] = 8
    p = _profiles(m)
    (ad,), (cn,) = p["controlnet/sketch"], p["controlnet/canny"]
    assert ad["controlnet_cond"] == {"min": [1, 3, 24, 24], "opt": [1, 3, 32, 24], "max": [1, 3, 64, 40]}
    assert cn["controlnet_cond"]["min"] == [1, 3, 18, 22]   # the ControlNet's multiple is the VAE's: unchanged
    with pytest.raises(UserError) as e:
        _profiles(m, height=(18, 20, 22))
    assert str(e.value) == ("controlnet/sketch: --height 18:20:22 holds no multiple of 8, which its control image's "
                            "size must be; give a range that does, or build the others with --components")


def test_build_covers_each_controlnet_and_residual_unet(engine_copy, monkeypatch):
    """The build loop with TensorRT replaced (a plan is the graph's name; the 'engine' is ONNX Runtime on the
    graph, so the parity check runs each graph at its OPT shapes): one plan each, under trt/<key>/, then cached."""
    m = Manifest.load(engine_copy)
    assert resolve_components(m, None) == ["text_encoder", "unet", "vae_decoder", *CONTROLS]
    assert resolve_components(m, ["controlnet/sketch"]) == ["controlnet/sketch"]
    with pytest.raises(UserError, match="controlnet/nope not in .* it has .*controlnet/canny, controlnet/sketch"):
        resolve_components(m, ["controlnet/nope"])
    built = _fake_tensorrt(monkeypatch, engine_copy)
    logs = []
    entries = build_engines(engine_copy, batch=(1, 1, 2), height=HEIGHT, width=WIDTH, log=logs.append)
    assert [c for c, _ in built] == ["text_encoder", "unet", "vae_decoder", *CONTROLS]
    m = Manifest.load(engine_copy)
    for comp, entry in zip(resolve_components(m, None), entries):
        assert entry["plan"] == f"trt/{entry['key']}/{comp}.plan"
        assert (engine_copy / entry["plan"]).read_text() == comp
        assert m.data["engines"][comp] == [entry] and entry["parity"]["rel_l2"] == 0.0
    assert not [p for p in (engine_copy / "trt").iterdir() if p.name.startswith(".tmp")]
    built.clear()
    build_engines(engine_copy, batch=(1, 1, 2), height=HEIGHT, width=WIDTH, log=logs.append)
    assert built == [] and all(" cached engine " in line for line in logs[-7:])


def test_one_graph_under_two_names_shares_one_plan(engine_copy, monkeypatch):
    """The same ControlNet exported under two names (the same graph, so the same key) is built once; re-exporting
    one of them later leaves the plan the other still uses."""
    data = json.loads((engine_copy / "sdrt.json").read_text())
    data["components"]["controlnet/twin"] = dict(data["components"]["controlnet/canny"])
    data["controlnets"]["twin"] = dict(data["controlnets"]["canny"], component="controlnet/twin")
    (engine_copy / "sdrt.json").write_text(json.dumps(data))
    built = _fake_tensorrt(monkeypatch, engine_copy)
    logs = []
    (canny, twin) = build_engines(engine_copy, batch=(1, 1, 2), height=HEIGHT, width=WIDTH, check_parity=False,
                                  components=["controlnet/canny", "controlnet/twin"], log=logs.append)
    assert built == [("controlnet/canny", False)] and twin == canny
    assert logs[-1] == f"controlnet/twin: the same graph and profiles as controlnet/canny: sharing its engine " \
                       f"{canny['key']}"
    m = Manifest.load(engine_copy)
    m.data["components"]["controlnet/twin"]["sha256"] = "f" * 64   # as after re-exporting twin from elsewhere
    record_entry(m, "controlnet/twin", {"key": "new", "onnx_sha256": "f" * 64})
    assert (engine_copy / canny["plan"]).is_file()


def _fake_tensorrt(monkeypatch, engine_dir) -> list:
    """TensorRT, Polygraphy, the graph preparation and the GPU replaced (as tests/engines/test_build.py does): the
    builds made, as (component, refittable)."""
    import types

    from sdrt.runtime.backends import cuda as cuda_mod

    monkeypatch.setattr(build_mod, "_import_build_deps", lambda: (types.SimpleNamespace(__version__="10.3.0"), None))
    monkeypatch.setattr(build_mod, "prepare_onnx", lambda src, dst, external_data, fold: src)
    monkeypatch.setattr(cuda_mod, "device_info", lambda device=0: ("Fake GPU", "8.9"))
    built = []
    names = {}
    for n, c in Manifest.load(engine_dir).data["components"].items():
        names.setdefault(str(engine_dir / c["file"]), n)   # a graph under two names: the first

    def fake_build_plan(trt, pg, onnx_path, profiles, precision, fp32_layers, timing_cache, opt_level, refit):
        built.append((names[str(onnx_path)], refit))
        return names[str(onnx_path)].encode()

    class OrtSession:
        def __init__(self, component):
            self.run = build_mod._ort_reference(engine_dir / Manifest.load(engine_dir).component(component)["file"])

        def close(self):
            pass

    monkeypatch.setattr(build_mod, "build_plan", fake_build_plan)
    monkeypatch.setattr(build_mod, "_engine_runner", lambda trt, comp, spec, d, name, profiles: OrtSession(comp))
    return built


def test_missing_tensorrt_is_one_line_naming_the_extra(engine_copy, tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "tensorrt.py").write_text("raise ImportError('hidden by the test')\n")
    r = run_cli("build", engine_copy, "--components", "controlnet/canny,unet_control",
                env={"PYTHONPATH": str(hide)})
    assert_one_line_error(r, "tensorrt is not installed", "pip install 'sdrt[gpu]'")


def test_the_tensorrt_backend_runs_controlnet_and_residual_unet_plans(engine_copy, monkeypatch):
    """The TensorRT backend against tests/runtime/fake_trt.py's stand-ins (a fake plan's outputs are scaled copies of
    its inputs): it loads controlnet/canny's plan from trt/<key>/controlnet/canny.plan and runs unet_control on the
    residuals the ControlNet's graph computes (ONNX Runtime), each residual's shape set from its feed within the
    profile `sdrt build` gave it; the adapter takes its one picture, not a batch."""
    import sys

    from sdrt.runtime.backends import cuda as cuda_mod
    from sdrt.runtime.backends.tensorrt import TensorRTBackend
    from tests.runtime.fake_trt import make_cudart, make_tensorrt
    from tests.runtime.test_tensorrt_backend import add_engine

    rt = make_cudart()
    monkeypatch.setattr(cuda_mod, "_cudart", rt)
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt())
    records = Manifest.load(engine_copy).data["controlnets"]
    fakes = {"controlnet/canny": {n: ("sample", 1.0) for n in records["canny"]["residuals"]}, "unet_control": None,
             "controlnet/sketch": {n: ("controlnet_cond", 1.0) for n in records["sketch"]["residuals"]}}
    jobs = {c: add_engine(engine_copy, size="18:34:66", component=c, outputs=o) for c, o in fakes.items()}
    m = Manifest.load(engine_copy)
    assert m.data["engines"]["controlnet/canny"][0]["plan"] == \
        f"trt/{jobs['controlnet/canny'].key}/controlnet/canny.plan"
    backend = TensorRTBackend()
    sessions = {c: backend.load(m, c) for c in fakes}
    shapes = {"sample": [4, 4, 17, 33], "timestep": [4], "encoder_hidden_states": [4, 77, 32],
              "controlnet_cond": [4, 3, 34, 66]}
    feeds = random_feeds(m.component("controlnet/canny")["inputs"], shapes, m.data["model"])
    assert sorted(sessions["controlnet/canny"].run(feeds)) == sorted(records["canny"]["residuals"])
    residuals = _run_feeds(m, "controlnet/canny", feeds)   # the shapes the graph computes
    unet = {n: feeds[n] for n in ("sample", "timestep", "encoder_hidden_states")}
    np.testing.assert_array_equal(sessions["unet_control"].run({**unet, **residuals})["out_sample"],
                                  feeds["sample"] * 0.5)
    picture = {"controlnet_cond": feeds["controlnet_cond"][:1]}
    assert sorted(sessions["controlnet/sketch"].run(picture)) == ["adapter_feature_0", "adapter_feature_1"]
    with pytest.raises(UserError, match="controlnet/sketch: no TensorRT profile accepts controlnet_cond"):
        sessions["controlnet/sketch"].run({"controlnet_cond": feeds["controlnet_cond"][:2]})
    for session in sessions.values():
        session.close()
    assert not rt.mem


# ---- on a GPU with TensorRT -----------------------------------------------------------------------------

@pytest.mark.gpu
def test_controlnet_plans_run_on_gpu_like_onnxruntime(engine_copy):
    """Build the ControlNet, adapter and residual UNet plans, run them through the TensorRT backend, the
    ControlNet's outputs into unet_control, against ONNX Runtime fp32 on the same inputs."""
    from tests.runtime.test_tensorrt_backend import _gpu_reason

    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    from sdrt.runtime.backends.tensorrt import TensorRTBackend

    build_engines(engine_copy, batch=(1, 1, 2), height=HEIGHT, width=WIDTH, components=CONTROLS, log=lambda s: None)
    m = Manifest.load(engine_copy)
    backend = TensorRTBackend()
    sessions = {c: backend.load(m, c) for c in CONTROLS}
    try:
        for latent, batch in (((17, 15), 2), ((9, 23), 4)):
            shapes = {"sample": [batch, 4, *latent], "timestep": [batch], "encoder_hidden_states": [batch, 77, 32],
                      "controlnet_cond": [batch, 3, 2 * latent[0], 2 * latent[1]]}
            spec = m.component("controlnet/canny")
            feeds = random_feeds(spec["inputs"], shapes, m.data["model"], seed=batch)
            got = sessions["controlnet/canny"].run(feeds)
            want = _run_feeds(m, "controlnet/canny", feeds)
            _close(got, want)
            unet_feeds = {n: feeds[n] for n in ("sample", "timestep", "encoder_hidden_states")}
            _close(sessions["unet_control"].run({**unet_feeds, **want}),
                   _run_feeds(m, "unet_control", {**unet_feeds, **want}))
            picture = {"controlnet_cond": feeds["controlnet_cond"][:1]}
            features = _run_feeds(m, "controlnet/sketch", picture)
            _close(sessions["controlnet/sketch"].run(picture), features)
            repeated = {n: np.repeat(f, batch, axis=0) for n, f in features.items()}
            _close(sessions["unet_adapter"].run({**unet_feeds, **repeated}),
                   _run_feeds(m, "unet_adapter", {**unet_feeds, **repeated}))
    finally:
        for s in sessions.values():
            s.close()


def _run_feeds(manifest, component, feeds):
    sess = ort.InferenceSession(str(manifest.engine_dir / manifest.component(component)["file"]),
                                providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _close(got, want):
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=2e-2, atol=2e-2, err_msg=name)
