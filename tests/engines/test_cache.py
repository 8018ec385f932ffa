from sdrt.engines.cache import cache_key, stale_reason

PROFILES = [{"sample": {"min": [1, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [4, 4, 16, 16]}}]
BASE = dict(onnx_sha256="a" * 64, precision="fp16", profiles=PROFILES, tensorrt_version="10.3.0",
            compute_capability="8.9")


def test_key_is_deterministic_and_short():
    k = cache_key(**BASE)
    assert k == cache_key(**BASE) and len(k) == 16 and int(k, 16) >= 0


def test_key_changes_with_each_input():
    base = cache_key(**BASE)
    variants = [
        dict(BASE, onnx_sha256="b" * 64), dict(BASE, precision="fp32"), dict(BASE, tensorrt_version="10.4.0"),
        dict(BASE, compute_capability="9.0"),
        dict(BASE, profiles=[{"sample": {"min": [1, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [4, 4, 32, 32]}}]),
        dict(BASE, profiles=PROFILES * 2),
    ]
    keys = {cache_key(**v) for v in variants}
    assert base not in keys and len(keys) == len(variants)


def test_key_ignores_dict_order():
    a = [{"x": {"min": [1], "opt": [1], "max": [1]}, "y": {"min": [2], "opt": [2], "max": [2]}}]
    b = [{"y": {"max": [2], "opt": [2], "min": [2]}, "x": {"min": [1], "opt": [1], "max": [1]}}]
    assert cache_key("s", "fp16", a, "10", "8.9") == cache_key("s", "fp16", b, "10", "8.9")


def _entry(tmp_path, **over):
    args = dict(BASE, **{k: v for k, v in over.items() if k in BASE})
    plan = tmp_path / "trt" / "k" / "unet.plan"
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(b"plan")
    e = {"key": cache_key(**args), "precision": args["precision"], "profiles": args["profiles"],
         "tensorrt_version": args["tensorrt_version"], "compute_capability": args["compute_capability"],
         "gpu_name": "NVIDIA L4", "plan": "trt/k/unet.plan", "size_bytes": 4}
    e.update({k: v for k, v in over.items() if k not in BASE})
    return e


def test_fresh_entry_is_usable(tmp_path):
    assert stale_reason(_entry(tmp_path), tmp_path, "a" * 64, "10.3.0", "8.9") is None


def test_stale_reasons(tmp_path):
    e = _entry(tmp_path)
    assert "TensorRT 10.3.0, running 10.5.0" in stale_reason(e, tmp_path, "a" * 64, "10.5.0", "8.9")
    assert "compute capability 8.9 (NVIDIA L4), this GPU is 9.0" in stale_reason(e, tmp_path, "a" * 64, "10.3.0", "9.0")
    assert "ONNX graph changed" in stale_reason(e, tmp_path, "c" * 64, "10.3.0", "8.9")
    assert "missing" in stale_reason(dict(e, plan="trt/x/unet.plan"), tmp_path, "a" * 64, "10.3.0", "8.9")
    assert "bytes" in stale_reason(dict(e, size_bytes=5), tmp_path, "a" * 64, "10.3.0", "8.9")
    assert "malformed" in stale_reason({k: v for k, v in e.items() if k != "profiles"}, tmp_path, "a" * 64,
                                       "10.3.0", "8.9")
