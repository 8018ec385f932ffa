"""The TensorRT backend. CPU tests run its logic against stand-ins for tensorrt and cuda-python
(tests/runtime/fake_trt.py); tests marked ``gpu`` need the real ones and skip with a reason otherwise."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from sdrt.engines.build import plan_jobs, record_entry, write_plan
from sdrt.engines.profiles import make_request
from sdrt.errors import MissingDependencyError, UserError
from sdrt.runtime.backends import cuda as cuda_mod
from sdrt.runtime.backends.tensorrt import TensorRTBackend, select_profile, usable_entries
from sdrt.runtime.manifest import Manifest
from tests.engines.fake_engine_dir import make_engine_dir
from tests.runtime.fake_trt import fake_plan, make_cudart, make_tensorrt

UNET_INPUTS = {"sample": "float32", "timestep": "float32", "encoder_hidden_states": "float32"}


def add_engine(engine_dir, static=False, batch="1:1:2", size="32:64:64", trt_version="10.3.0", cc="8.9",
               plan=None, refittable=False, component="unet", outputs=None):
    """A fake plan of ``component`` and its manifest entry, as `sdrt build` writes them; ``outputs``: the fake's
    (each output a scaled copy of an input: tests/runtime/fake_trt.py), the UNet's by default."""
    m = Manifest.load(engine_dir)
    req = make_request(m.data["model"], batch=batch, height=size, width=size, static=static)
    (job,) = plan_jobs(m, req, "fp16", [component], trt_version, cc, refittable=refittable)
    inputs = {i["name"]: i["dtype"] for i in m.component(component)["inputs"]}
    data = plan if plan is not None else fake_plan(inputs, outputs or {"out_sample": ("sample", 0.5)}, job.profiles)
    rel = write_plan(engine_dir, job.key, component, data)
    record_entry(m, component, {
        "key": job.key, "precision": "fp16", "profiles": job.profiles, "static": static,
        "tensorrt_version": trt_version, "gpu_name": "Fake GPU", "compute_capability": cc, "plan": rel,
        "size_bytes": len(data), "onnx_sha256": m.component(component)["sha256"], "fallback_fp32": False,
        "refittable": refittable})
    return job


@pytest.fixture
def engine_dir(tmp_path):
    return make_engine_dir(tmp_path / "engine")


@pytest.fixture
def fake_gpu(monkeypatch):
    rt, trt = make_cudart(), make_tensorrt()
    monkeypatch.setattr(cuda_mod, "_cudart", rt)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return rt, trt


def unet_feeds(batch, size, seed=0):
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((batch, 4, size, size)).astype(np.float32),
            "timestep": np.full((batch,), 10.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 8, 16)).astype(np.float32)}


def test_importing_the_backend_imports_no_tensorrt_or_cuda():
    code = ("import sys, sdrt.runtime.backends.tensorrt, sdrt.engines.build, sdrt.engines.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'cuda', 'polygraphy', 'torch')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_tensorrt_names_the_gpu_extra(engine_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match=r"tensorrt is not installed .*'sdrt\[gpu\]'"):
        TensorRTBackend().load(Manifest.load(engine_dir), "unet")


def test_missing_cuda_python_names_the_gpu_extra(engine_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt())
    monkeypatch.setattr(cuda_mod, "_cudart", None)
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError, match=r"cuda-python is not installed .*'sdrt\[gpu\]'"):
        TensorRTBackend().load(Manifest.load(engine_dir), "unet")


def test_no_gpu_is_a_clear_user_error(engine_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt())
    monkeypatch.setattr(cuda_mod, "_cudart", make_cudart(devices=0))
    with pytest.raises(UserError, match="no CUDA GPU is usable here .*no CUDA-capable device"):
        TensorRTBackend().load(Manifest.load(engine_dir), "unet")


def test_no_engines_says_to_run_build(engine_dir, fake_gpu):
    with pytest.raises(UserError, match="unet: no TensorRT engine in .*`sdrt build "):
        TensorRTBackend().load(Manifest.load(engine_dir), "unet")


@pytest.mark.parametrize("kwargs,needle", [
    (dict(trt_version="10.0.1"), "built with TensorRT 10.0.1, running 10.3.0"),
    (dict(cc="9.0"), "built for compute capability 9.0"),
])
def test_stale_engines_are_refused_with_the_reason(engine_dir, fake_gpu, kwargs, needle):
    add_engine(engine_dir, **kwargs)
    with pytest.raises(UserError, match="every TensorRT engine .* is stale") as e:
        TensorRTBackend().load(Manifest.load(engine_dir), "unet")
    assert needle in str(e.value) and "rerun `sdrt build" in str(e.value)


def test_reexported_graph_makes_engines_stale(engine_dir, fake_gpu):
    add_engine(engine_dir)
    m = Manifest.load(engine_dir)
    m.data["components"]["unet"]["sha256"] = "f" * 64  # as after a re-export
    with pytest.raises(UserError, match="ONNX graph changed"):
        usable_entries(m, "unet", "10.3.0", "8.9")


def test_runs_and_reuses_buffers_per_shape(engine_dir, fake_gpu):
    rt, trt = fake_gpu
    add_engine(engine_dir)
    session = TensorRTBackend(max_shape_sets=2).load(Manifest.load(engine_dir), "unet")
    feeds = unet_feeds(2, 16)
    out = session.run(feeds)
    np.testing.assert_array_equal(out["out_sample"], feeds["sample"] * 0.5)
    allocated = rt.log["malloc"]
    assert allocated == 4  # three inputs and one output, once
    out2 = session.run(unet_feeds(2, 16, seed=1))
    assert rt.log["malloc"] == allocated and not np.shares_memory(out["out_sample"], out2["out_sample"])
    session.run(unet_feeds(1, 32))
    assert rt.log["malloc"] == 2 * allocated
    session.run(unet_feeds(2, 24))  # a third shape set evicts the oldest (max_shape_sets=2)
    assert rt.log["free"] == allocated
    np.testing.assert_array_equal(session.run(feeds)["out_sample"], feeds["sample"] * 0.5)
    session.close()
    assert not rt.mem


def test_request_outside_every_profile_names_the_profiles(engine_dir, fake_gpu):
    add_engine(engine_dir)
    session = TensorRTBackend().load(Manifest.load(engine_dir), "unet")
    with pytest.raises(UserError) as e:
        session.run(unet_feeds(1, 64))  # latent 64 = 128 px, above the 64 px maximum
    msg = str(e.value)
    assert "no TensorRT profile accepts sample [1, 4, 64, 64]" in msg
    assert "sample [1,4,16,16]..[4,4,32,32]" in msg and "--batch/--height/--width" in msg


def test_static_engine_picks_the_guided_profile_and_replays_a_cuda_graph(engine_dir, fake_gpu):
    rt, trt = fake_gpu
    add_engine(engine_dir, static=True, batch="1", size="32")
    session = TensorRTBackend(cuda_graph=True).load(Manifest.load(engine_dir), "unet")
    for _ in range(3):
        feeds = unet_feeds(2, 16)
        np.testing.assert_array_equal(session.run(feeds)["out_sample"], feeds["sample"] * 0.5)
    assert ("profile", 1) in trt.log  # batch 2 = the guided profile
    # First run executes directly; the second captures and launches; the third only launches.
    assert trt.log.count(("execute",)) == 2 and rt.log["graph_launch"] == 2
    feeds = unet_feeds(1, 16)
    np.testing.assert_array_equal(session.run(feeds)["out_sample"], feeds["sample"] * 0.5)
    assert trt.log[-2:] == [("profile", 0), ("execute",)]


def test_switching_shape_sets_enqueues_once_before_capturing_again(engine_dir, fake_gpu):
    """TensorRT wants one plain enqueue after a shape change before a graph capture, even for a shape set
    that ran before under another context setup."""
    rt, trt = fake_gpu
    add_engine(engine_dir, static=True, batch="1", size="32")
    session = TensorRTBackend(cuda_graph=True).load(Manifest.load(engine_dir), "unet")
    session.run(unet_feeds(2, 16))  # batch 2: plain run
    session.run(unet_feeds(1, 16))  # batch 1: switch, plain run
    session.run(unet_feeds(2, 16))  # back to batch 2: shapes changed again, so plain again, no capture
    assert rt.log["graph_launch"] == 0 and trt.log.count(("execute",)) == 3
    session.run(unet_feeds(2, 16))  # now it captures
    assert rt.log["graph_launch"] == 1
    session.close()


def test_a_failed_cuda_graph_capture_falls_back_to_plain_runs_for_good(engine_dir, fake_gpu):
    rt, trt = fake_gpu
    captures = []

    def refuse(stream, mode):
        captures.append(stream)
        return (cuda_mod.cudart().cudaError_t.cudaErrorNoDevice,)

    rt.cudaStreamBeginCapture = refuse
    add_engine(engine_dir, static=True, batch="1", size="32")
    session = TensorRTBackend(cuda_graph=True).load(Manifest.load(engine_dir), "unet")
    for _ in range(4):
        feeds = unet_feeds(2, 16)
        np.testing.assert_array_equal(session.run(feeds)["out_sample"], feeds["sample"] * 0.5)
    assert len(captures) == 1, "the capture was retried"
    assert trt.log.count(("execute",)) == 4 and rt.log["graph_launch"] == 0
    session.close()


def test_an_error_after_queued_copies_synchronises_before_releasing_the_lock(engine_dir, fake_gpu, monkeypatch):
    rt, trt = fake_gpu
    add_engine(engine_dir)
    session = TensorRTBackend().load(Manifest.load(engine_dir), "unet")
    events = []
    real_copy = cuda_mod.copy_to_device

    def copy(dst, src, stream):
        events.append("h2d")
        return real_copy(dst, src, stream)

    rt.cudaStreamSynchronize = lambda s: (events.append("sync"), (rt.cudaError_t.cudaSuccess,))[1]
    monkeypatch.setattr(cuda_mod, "copy_to_device", copy)

    class Failing:
        def __init__(self, lock):
            self.lock = lock

        def __enter__(self):
            return self.lock.__enter__()

        def __exit__(self, *exc):
            events.append("unlock")
            return self.lock.__exit__(*exc)

    session._lock = Failing(session._lock)
    session._enqueue = lambda eng: (_ for _ in ()).throw(RuntimeError("execute_async_v3 failed"))
    with pytest.raises(RuntimeError, match="execute_async_v3 failed"):
        session.run(unet_feeds(1, 16))
    assert events[-2:] == ["sync", "unlock"] and "h2d" in events
    # a failing synchronise does not hide the first error
    rt.cudaStreamSynchronize = lambda s: (rt.cudaError_t.cudaErrorNoDevice,)
    with pytest.raises(RuntimeError, match="execute_async_v3 failed"):
        session.run(unet_feeds(1, 16))


def test_the_runtime_imports_no_higher_layer():
    code = ("import sys, sdrt.runtime, sdrt.runtime.pipeline, sdrt.runtime.backends.tensorrt, sdrt.runtime.cli; "
            "bad = [m for m in sys.modules if m.startswith(('sdrt.engines', 'sdrt.serve', 'sdrt.export'))]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_static_and_narrow_entries_are_preferred(engine_dir, fake_gpu):
    dynamic = add_engine(engine_dir, batch="1:1:4", size="32:64:128")
    static = add_engine(engine_dir, static=True, batch="1", size="64")
    entries = usable_entries(Manifest.load(engine_dir), "unet", "10.3.0", "8.9")
    assert [e["key"] for e in entries] == [static.key, dynamic.key]
    entry, profile = select_profile("unet", entries, {n: v.shape for n, v in unet_feeds(2, 32).items()})
    assert entry["key"] == static.key and profile == 1
    entry, _ = select_profile("unet", entries, {n: v.shape for n, v in unet_feeds(3, 32).items()})
    assert entry["key"] == dynamic.key


def test_corrupt_plan_says_to_rebuild(engine_dir, fake_gpu):
    add_engine(engine_dir, plan=b"not a plan")
    session = TensorRTBackend().load(Manifest.load(engine_dir), "unet")
    with pytest.raises(UserError, match="could not deserialize .*rerun `sdrt build"):
        session.run(unet_feeds(1, 16))


def test_feeds_are_checked_before_the_engine(engine_dir, fake_gpu):
    add_engine(engine_dir)
    session = TensorRTBackend().load(Manifest.load(engine_dir), "unet")
    feeds = unet_feeds(1, 16)
    feeds["timestep"] = feeds["timestep"].astype(np.float64)
    with pytest.raises(UserError, match="timestep.*float64, expected float32"):
        session.run(feeds)


# ---- on a GPU with TensorRT -----------------------------------------------------------------------------

def _gpu_reason():
    for mod in ("tensorrt", "polygraphy", "onnx_graphsurgeon"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install 'sdrt[gpu]')"
    if importlib.util.find_spec("cuda") is None:
        return "cuda-python is not installed (pip install 'sdrt[gpu]')"
    try:
        cuda_mod.device_info()
    except Exception as e:  # noqa: BLE001 - any failure means: no usable GPU here
        return f"no usable CUDA GPU: {e}"
    return None


gpu = pytest.mark.gpu


@gpu
def test_build_and_run_on_gpu_matches_onnxruntime(tmp_path):
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    import onnxruntime as ort

    from sdrt.engines.build import build_engines

    engine_dir = make_engine_dir(tmp_path / "engine")
    entries = build_engines(engine_dir, batch=(1, 1, 2), height=(32, 64, 64), width=(32, 64, 64), log=lambda s: None)
    assert {e["fallback_fp32"] for e in entries} <= {False, True}
    m = Manifest.load(engine_dir)
    backend = TensorRTBackend(cuda_graph=True)
    for comp, feeds in (("unet", unet_feeds(2, 16)),
                        ("text_encoder", {"input_ids": np.arange(16, dtype=np.int64).reshape(2, 8)}),
                        ("vae_decoder", {"latent_sample": unet_feeds(1, 16)["sample"]})):
        session = backend.load(m, comp)
        ref = ort.InferenceSession(str(engine_dir / comp / "model.onnx"), providers=["CPUExecutionProvider"])
        want = dict(zip([o.name for o in ref.get_outputs()], ref.run(None, feeds)))
        for _ in range(2):
            got = session.run(feeds)
            for name, w in want.items():
                np.testing.assert_allclose(got[name], w, rtol=2e-2, atol=2e-2)
        session.close()


@gpu
def test_cuda_buffer_roundtrip_on_gpu():
    if importlib.util.find_spec("cuda") is None:
        pytest.skip("cuda-python is not installed (pip install 'sdrt[gpu]')")
    try:
        cuda_mod.device_info()
    except UserError as e:
        pytest.skip(str(e))
    a = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    np.testing.assert_array_equal(cuda_mod.roundtrip(a), a)


def test_profiles_bound_the_prompt_length(engine_dir, fake_gpu):
    add_engine(engine_dir)  # default prompt chunks 1:1:3; the fake model reads 8 tokens per chunk
    session = TensorRTBackend().load(Manifest.load(engine_dir), "unet")
    assert session.dim_limit("encoder_hidden_states", 1) == 24 and session.dim_limit("sample", 0) == 4
    feeds = unet_feeds(2, 16)
    feeds["encoder_hidden_states"] = np.zeros((2, 24, 16), np.float32)  # three chunks
    np.testing.assert_array_equal(session.run(feeds)["out_sample"], feeds["sample"] * 0.5)
    feeds["encoder_hidden_states"] = np.zeros((2, 32, 16), np.float32)
    with pytest.raises(UserError, match="no TensorRT profile accepts"):
        session.run(feeds)


def _refittable_engine(engine_dir, refittable=True):
    m = Manifest.load(engine_dir)
    req = make_request(m.data["model"], batch="1:1:2", height="32:64:64", width="32:64:64", static=False)
    (job,) = plan_jobs(m, req, "fp16", ["unet"], "10.3.0", "8.9", refittable=refittable)
    plan = fake_plan(UNET_INPUTS, {"out_sample": ("sample", "half")}, job.profiles,
                     weights={"half": [0.5], "tscale": [7.0]}, refittable=refittable, layers=[["half", "tscale"]])
    return add_engine(engine_dir, plan=plan, refittable=refittable)


def test_refittable_plans_have_their_own_cache_key(engine_dir):
    m = Manifest.load(engine_dir)
    req = make_request(m.data["model"], batch="1:1:2", height="32:64:64", width="32:64:64", static=False)
    (plain,) = plan_jobs(m, req, "fp16", ["unet"], "10.3.0", "8.9")
    (refit,) = plan_jobs(m, req, "fp16", ["unet"], "10.3.0", "8.9", refittable=True)
    assert plain.key != refit.key and refit.refittable and not plain.refittable
    _refittable_engine(engine_dir)
    entry = Manifest.load(engine_dir).data["engines"]["unet"][0]
    assert entry["refittable"] and entry["key"] == refit.key
    # the runtime recomputes the key with the flag: a refittable entry is not stale
    assert usable_entries(Manifest.load(engine_dir), "unet", "10.3.0", "8.9")[0]["key"] == refit.key


def test_loras_refit_a_refittable_plan_at_load(engine_dir, fake_gpu):
    _, trt = fake_gpu
    _refittable_engine(engine_dir)
    m = Manifest.load(engine_dir)
    feeds = unet_feeds(1, 32)
    plain = TensorRTBackend().load(m, "unet").run(feeds)["out_sample"]
    np.testing.assert_allclose(plain, feeds["sample"] * 0.5, rtol=1e-6)
    session = TensorRTBackend().load(m, "unet", initializers={"half": np.array([2.0], np.float32)})
    out = session.run(feeds)["out_sample"]
    np.testing.assert_allclose(out, feeds["sample"] * 2.0, rtol=1e-6)
    # the layer's other weight TensorRT asked for came from the graph's stored value, not the plan's
    assert ("set", "tscale") in trt.log and ("refit", ["half", "tscale"]) in trt.log
    assert session._engines[session.entries[0]["key"]].engine.plan["weights"]["tscale"] == [pytest.approx(1e-3)]


def test_overrides_need_a_refittable_plan(engine_dir, fake_gpu):
    add_engine(engine_dir)  # built without --refittable
    with pytest.raises(UserError, match="--refittable"):
        TensorRTBackend().load(Manifest.load(engine_dir), "unet", initializers={"half": np.array([2.0], np.float32)})


def test_a_weight_the_plan_cannot_refit_is_named(engine_dir, fake_gpu):
    _refittable_engine(engine_dir)
    with pytest.raises(UserError, match="no refittable weight 'tshape'"):
        TensorRTBackend().load(Manifest.load(engine_dir), "unet",
                               initializers={"tshape": np.array([-1, 1, 1, 2], np.int64)})


def test_a_grown_table_is_refused_on_tensorrt(engine_dir, fake_gpu):
    _refittable_engine(engine_dir)
    with pytest.raises(UserError, match="change shape .*textual-inversion"):
        TensorRTBackend().load(Manifest.load(engine_dir), "unet", initializers={"half": np.ones(3, np.float32)})
