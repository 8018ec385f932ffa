"""TensorRT engine entries as the runtime reads them: cache keys, staleness, and fitting shapes to profiles.

A plan is valid for exactly one ONNX graph, precision, set of optimization profiles, TensorRT version and
GPU compute capability (and a refittable plan is another plan), so the cache key hashes those and nothing else (not the file's existence, not
its name). The runtime recomputes the key from what it sees (the manifest's current ONNX sha256, the
running TensorRT, the GPU) and refuses an entry whose key differs: a stale plan is detected, never used.

Both `sdrt build` (sdrt.engines, which imports this) and the TensorRT backend need these; they live here so
the runtime imports no higher layer. Pure Python: no TensorRT, no CUDA.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

KEY_FORMAT = 1
KEY_LENGTH = 16  # hex digits in folder names; collisions at 64 bits are not a concern for one directory


def cache_key(onnx_sha256: str, precision: str, profiles: list, tensorrt_version: str,
              compute_capability: str, refittable: bool = False) -> str:
    """The key of a plan (hex). ``profiles`` is the JSON form: ``[{input: {"min", "opt", "max"}}]``.
    ``refittable`` (built with TensorRT's REFIT flag) enters the key only when set, so older keys stay valid."""
    payload = {
        "key_format": KEY_FORMAT,
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "profiles": [{name: {k: [int(x) for x in s[k]] for k in ("min", "opt", "max")}
                      for name, s in sorted(p.items())} for p in profiles],
        "tensorrt_version": str(tensorrt_version),
        "compute_capability": str(compute_capability),
    }
    if refittable:
        payload["refittable"] = True
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def entry_key(entry: Mapping[str, Any], onnx_sha256: str) -> str:
    """The key ``entry`` should have if its plan was built from the graph with ``onnx_sha256``."""
    return cache_key(onnx_sha256, entry["precision"], entry["profiles"], entry["tensorrt_version"],
                     entry["compute_capability"], bool(entry.get("refittable", False)))


def stale_reason(entry: Mapping[str, Any], engine_dir: Path, onnx_sha256: str, tensorrt_version: str,
                 compute_capability: str) -> str | None:
    """Why ``entry`` cannot be used here, or None if it can."""
    if entry.get("tensorrt_version") != str(tensorrt_version):
        return f"built with TensorRT {entry.get('tensorrt_version')}, running {tensorrt_version}"
    if entry.get("compute_capability") != str(compute_capability):
        return (f"built for compute capability {entry.get('compute_capability')} "
                f"({entry.get('gpu_name', '?')}), this GPU is {compute_capability}")
    try:
        expected = entry_key(entry, onnx_sha256)
    except (KeyError, TypeError, ValueError):
        return "malformed engine entry"
    if entry.get("key") != expected:
        return "the ONNX graph changed since the plan was built (cache key mismatch)"
    plan = Path(engine_dir) / entry.get("plan", "")
    if not plan.is_file():
        return f"plan file {entry.get('plan')} is missing"
    if entry.get("size_bytes") is not None and plan.stat().st_size != entry["size_bytes"]:
        return f"plan file {entry.get('plan')} is {plan.stat().st_size} bytes, manifest says {entry['size_bytes']}"
    return None


def find_entry(entries: list[Mapping[str, Any]], key: str) -> Mapping[str, Any] | None:
    for e in entries:
        if e.get("key") == key:
            return e
    return None


# ---- profiles ------------------------------------------------------------------------------------------

def is_static(profiles: list[dict[str, dict[str, list[int]]]]) -> bool:
    return all(s["min"] == s["opt"] == s["max"] for p in profiles for s in p.values())


def profile_fits(profile: Mapping[str, Mapping[str, list[int]]], shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether every input shape lies within the profile's min..max, dimension by dimension."""
    for name, shape in shapes.items():
        s = profile.get(name)
        if s is None or len(s["min"]) != len(shape):
            return False
        if any(not lo <= d <= hi for d, lo, hi in zip(shape, s["min"], s["max"])):
            return False
    return True


def describe_profile(profile: Mapping[str, Mapping[str, list[int]]]) -> str:
    """``sample [1,4,32,32]..[8,4,128,128]; timestep ...`` for error messages."""
    def fmt(v):
        return "[" + ",".join(str(x) for x in v) + "]"
    return "; ".join(f"{n} {fmt(s['min'])}..{fmt(s['max'])}" for n, s in profile.items())
