"""``sdrt build``: ONNX components of an engine directory -> TensorRT plans under ``trt/<key>/``.

Through Polygraphy's loaders (``NetworkFromOnnxPath`` -> ``PostprocessNetwork`` -> ``CreateConfig`` ->
``EngineBytesFromNetwork``), all imported lazily. Per component:

1. the profiles follow from the requested ranges (:mod:`sdrt.engines.profiles`) and the cache key from
   what makes a plan valid (:mod:`sdrt.engines.cache`); an entry with that key and its plan present is
   reused, not rebuilt;
2. the graph is cleaned and constant-folded with onnx-graphsurgeon into a temporary folder;
3. fp16 is tried in tiers, each kept only if it passes :mod:`sdrt.engines.parity` against ONNX Runtime
   fp32: plain fp16 (TensorRT's fused attention already keeps softmax statistics in fp32), then fp16 with
   softmax / normalization / reduction layers pinned to fp32, then fp32 (``fallback_fp32``). A VAE whose
   config says ``force_upcast`` in an SDXL model (whose VAE overflows in fp16) is built in fp32, as
   diffusers' SDXL pipelines run it,
   and its entry says why (``fp32_reason``); an fp16-safe VAE exported in its place (its config says
   ``force_upcast: false``, the manifest's ``model.force_upcast`` records which) goes through the fp16 tiers;
4. with ``refittable`` the plan is built with TensorRT's REFIT flag (and the graph is not constant-folded
   beforehand, so every weight keeps its ONNX initializer's name): the runtime can then replace weights
   (LoRAs) with ``trt.Refitter`` instead of a rebuild; the entry says ``refittable`` and its key differs;
5. the plan is written into ``trt/.tmp-<key>-<pid>/`` and renamed to ``trt/<key>/``; the manifest gets the
   entry and is saved atomically after each component, so an interrupted build keeps finished work.

An engine with ControlNets or T2I-Adapters (`sdrt export --controlnet`) also gets a plan per ``controlnet/NAME``
(``trt/<key>/controlnet/NAME.plan``) and for ``unet_control`` / ``unet_adapter``, with the UNet's ranges
(:mod:`sdrt.engines.profiles`). Two components with one key (the same ControlNet exported under two names: the
same graph, hence the same sha256) share one plan: the second entry names the first's file, built once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from sdrt.engines.cache import cache_key, find_entry, stale_reason
from sdrt.engines.parity import Verdict, check_engine
from sdrt.engines.profiles import DEFAULT_PROMPT_CHUNKS, ShapeRequest, component_profiles, make_request
from sdrt.errors import MissingDependencyError, UserError
from sdrt.runtime.control import CONTROLNETS, UNET_ADAPTER, UNET_CONTROL, control_record
from sdrt.runtime.families import family_class
from sdrt.runtime.manifest import COMPONENTS, Manifest

PRECISIONS = ("fp16", "fp32")
TRT_DIR = "trt"
# Tiers tried for an fp16 request: (precision the builder uses, which layers are pinned to fp32).
FP16_TIERS = (("fp16", "none"), ("fp16", "sensitive"), ("fp32", "all"))
FP32_TIERS = (("fp32", "all"),)
VAE_FP32_REASON = ("force_upcast: this VAE overflows in fp16 (SDXL's does); export an fp16-safe VAE "
                   "(force_upcast: false in its config) to build it in fp16")


@dataclass
class BuildJob:
    """What one component's build needs to know; ``cached`` when a valid plan with its key is present."""

    component: str
    precision: str
    profiles: list
    key: str
    cached: bool
    tiers: tuple = field(default_factory=tuple)
    fp32_reason: str | None = None  # why an fp16 request builds fp32 only
    refittable: bool = False


def plan_jobs(manifest: Manifest, req: ShapeRequest, precision: str, components: list[str],
              tensorrt_version: str, compute_capability: str, refittable: bool = False) -> list[BuildJob]:
    """The builds to do (pure: no TensorRT), one per component."""
    model = manifest.data["model"]
    jobs = []
    for comp in components:
        spec = manifest.component(comp)
        profiles = component_profiles(comp, spec["inputs"], model, req, _control(manifest, comp))
        key = cache_key(spec["sha256"], precision, profiles, tensorrt_version, compute_capability, refittable)
        entry = find_entry(manifest.data.get("engines", {}).get(comp, []), key)
        cached = entry is not None and stale_reason(
            entry, manifest.engine_dir, spec["sha256"], tensorrt_version, compute_capability) is None
        tiers = FP32_TIERS if precision == "fp32" else FP16_TIERS
        reason = None
        # diffusers reads force_upcast in its SDXL pipelines only (SD1/SD2 VAEs run in fp16 there; the
        # parity gate still catches one that overflows)
        if precision == "fp16" and comp.startswith("vae") and model.get("force_upcast") \
                and family_class(model.get("family")).vae_upcast:
            tiers = FP32_TIERS
            reason = VAE_FP32_REASON
        jobs.append(BuildJob(comp, precision, profiles, key, cached, tiers, reason, refittable))
    return jobs


def _control(manifest: Manifest, component: str) -> dict | None:
    """The ``controlnets`` record of a ``controlnet/NAME`` component (None for the others)."""
    record = control_record(manifest.data.get(CONTROLNETS) or {}, component)
    if record is None and component.startswith("controlnet/"):
        raise UserError(f"{component}: the manifest's {CONTROLNETS} section has no record for it (re-export the model)")
    return record


def buildable(manifest: Manifest) -> list[str]:
    """What `sdrt build` builds by default: the base components, each ControlNet's and T2I-Adapter's graph and the
    UNet graphs taking their outputs."""
    controls = [r.get("component") for r in (manifest.data.get(CONTROLNETS) or {}).values()]
    return [c for c in (*COMPONENTS, *controls, UNET_CONTROL, UNET_ADAPTER) if manifest.has(c)]


def shared_entry(manifest: Manifest, component: str, key: str, tensorrt_version: str,
                 compute_capability: str) -> tuple[str, dict] | None:
    """Another component's usable entry with ``key`` (the key hashes the graph's sha256, so its plan is this one's)."""
    sha = manifest.component(component)["sha256"]
    for other, entries in manifest.data.get("engines", {}).items():
        entry = find_entry(entries, key) if other != component else None
        if entry is not None and stale_reason(entry, manifest.engine_dir, sha, tensorrt_version,
                                              compute_capability) is None:
            return other, dict(entry)
    return None


def resolve_components(manifest: Manifest, components: list[str] | None) -> list[str]:
    present = buildable(manifest)
    if not components:
        return present
    bad = [c for c in components if c not in present]
    if bad:
        raise UserError(f"--components: {', '.join(bad)} not in {manifest.engine_dir}; it has {', '.join(present)}")
    return list(components)


def write_plan(engine_dir: Path, key: str, component: str, plan: bytes, info: Mapping[str, Any] | None = None) -> str:
    """Write ``plan`` to ``trt/<key>/<component>.plan`` via a temporary folder renamed into place."""
    import json

    root = Path(engine_dir) / TRT_DIR
    root.mkdir(exist_ok=True)
    tmp = root / f".tmp-{key}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    (tmp / f"{component}.plan").parent.mkdir(parents=True, exist_ok=True)   # controlnet/NAME.plan
    (tmp / f"{component}.plan").write_bytes(plan)
    if info is not None:
        (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    final = root / key
    if final.exists():  # left by an interrupted or refused build: never referenced by the manifest
        shutil.rmtree(final)
    os.replace(tmp, final)
    return f"{TRT_DIR}/{key}/{component}.plan"


def record_entry(manifest: Manifest, component: str, entry: dict[str, Any]) -> None:
    """Add ``entry`` (replacing one with its key), drop entries for an older ONNX graph (and their plans, unless
    another component's entry shares them), save atomically."""
    engines = manifest.data.setdefault("engines", {})
    current_sha = manifest.component(component)["sha256"]
    shared = {e.get("key") for c, es in engines.items() if c != component for e in es}
    kept = []
    for e in engines.get(component, []):
        if e.get("key") == entry["key"]:
            continue
        if e.get("onnx_sha256") not in (None, current_sha):
            old = manifest.engine_dir / TRT_DIR / str(e.get("key"))
            if old.is_dir() and e.get("key") and e.get("key") not in shared:
                shutil.rmtree(old)
            continue
        kept.append(e)
    kept.append(entry)
    engines[component] = kept
    manifest.save()


# ---- TensorRT side (lazy imports; runs only where TensorRT and a GPU are) -------------------------------

def _import_build_deps():
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError("tensorrt", "gpu", "`sdrt build` makes TensorRT plans") from None
    try:
        import polygraphy.backend.trt as pg_trt
    except ImportError:
        raise MissingDependencyError("polygraphy", "gpu", "`sdrt build` builds through its loaders") from None
    try:
        import onnx_graphsurgeon  # noqa: F401
    except ImportError:
        raise MissingDependencyError("onnx-graphsurgeon", "gpu", "`sdrt build` cleans graphs with it") from None
    return trt, pg_trt


def prepare_onnx(src: Path, dst_dir: Path, external_data: bool, fold: bool = True) -> Path:
    """Cleanup, toposort and (below 2 GiB, unless not ``fold``) constant folding with onnx-graphsurgeon; big
    weights stay external. A refittable build does not fold: folding would rename the weights it touches."""
    import onnx
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(onnx.load(str(src)))
    graph.cleanup().toposort()
    if fold and not external_data:
        # fold_constants evaluates the graph in ONNX Runtime from one serialized protobuf, which cannot
        # exceed 2 GiB; large graphs are left to TensorRT's own constant folding at build time.
        graph.fold_constants()
        graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    out = dst_dir / "model.onnx"
    if external_data:
        onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data")
    else:
        onnx.save_model(model, str(out))
    return out


def _pin_sensitive_layers(trt, network):
    """Softmax, normalization and reduction layers compute and output fp32 (precision constraints: prefer)."""
    kinds = {getattr(trt.LayerType, n) for n in ("SOFTMAX", "NORMALIZATION", "REDUCE") if hasattr(trt.LayerType, n)}
    for layer in network:
        if layer.type in kinds:
            layer.precision = trt.float32
            for i in range(layer.num_outputs):
                layer.set_output_type(i, trt.float32)
    return network


def build_plan(trt, pg_trt, onnx_path: Path, profiles: list, precision: str, fp32_layers: str,
               timing_cache: str | None, opt_level: int, refittable: bool = False) -> bytes:
    """One serialized plan through Polygraphy's loaders."""
    network = pg_trt.NetworkFromOnnxPath(str(onnx_path))
    if fp32_layers == "sensitive":
        # Polygraphy calls ``func(network=network)``: the parameter must be named ``network``.
        network = pg_trt.PostprocessNetwork(network, lambda network: _pin_sensitive_layers(trt, network),
                                            name="sdrt-pin-sensitive-fp32")
    trt_profiles = []
    for p in profiles:
        prof = pg_trt.Profile()
        for name, s in p.items():
            prof.add(name, min=s["min"], opt=s["opt"], max=s["max"])
        trt_profiles.append(prof)
    config = pg_trt.CreateConfig(
        fp16=(precision == "fp16"),
        profiles=trt_profiles,
        precision_constraints="prefer" if fp32_layers == "sensitive" else None,
        load_timing_cache=timing_cache if timing_cache and os.path.exists(timing_cache) else None,
        builder_optimization_level=opt_level,
        refittable=refittable,
    )
    plan = pg_trt.EngineBytesFromNetwork(network, config=config, save_timing_cache=timing_cache)()
    if plan is None:
        raise UserError(f"TensorRT could not build {onnx_path}")
    return bytes(plan)


def _ort_reference(onnx_path: Path):
    import onnxruntime as ort

    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    sess = ort.InferenceSession(str(onnx_path), providers=providers)
    return lambda feeds: dict(zip([o.name for o in sess.get_outputs()], sess.run(None, dict(feeds))))


def _engine_runner(trt, component: str, spec: Mapping[str, Any], plan_dir: Path, plan_name: str, profiles: list):
    from sdrt.runtime.backends.base import TensorSpec
    from sdrt.runtime.backends.tensorrt import TensorRTSession

    entry = {"key": "parity-check", "plan": plan_name, "profiles": profiles, "precision": "?"}
    session = TensorRTSession(component, tuple(TensorSpec.from_dict(d) for d in spec["inputs"]),
                              tuple(TensorSpec.from_dict(d) for d in spec["outputs"]), [entry], plan_dir, trt)
    return session


def build_engines(engine_dir, precision: str = "fp16", batch=(1, 1, 4), height=None, width=None,
                  static: bool = False, timing_cache: str | None = None, components: list[str] | None = None,
                  opt_level: int = 3, check_parity: bool = True, chunks=DEFAULT_PROMPT_CHUNKS,
                  refittable: bool = False, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Build (or reuse) one engine per component; returns the manifest entries in use. ``refittable``: plans
    whose weights the runtime can replace (LoRAs at run time) without a rebuild."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if not 0 <= int(opt_level) <= 5:
        raise UserError(f"--opt-level {opt_level}: TensorRT builder optimization levels are 0..5")
    manifest = Manifest.load(engine_dir, verify="sha256")
    comps = resolve_components(manifest, components)
    req = make_request(manifest.data["model"], batch, height, width, static, chunks)

    trt, pg_trt = _import_build_deps()
    from sdrt.runtime.backends import cuda

    gpu_name, cc = cuda.device_info()
    jobs = plan_jobs(manifest, req, precision, comps, trt.__version__, cc, refittable)
    model = manifest.data["model"]
    used = []
    for job in jobs:
        entries = manifest.data.get("engines", {}).get(job.component, [])
        if job.cached:
            log(f"{job.component}: cached engine {job.key}")
            used.append(find_entry(entries, job.key))
            continue
        spec = manifest.component(job.component)
        same = shared_entry(manifest, job.component, job.key, trt.__version__, cc)
        if same is not None:
            log(f"{job.component}: the same graph and profiles as {same[0]}: sharing its engine {job.key}")
            record_entry(manifest, job.component, dict(same[1]))
            used.append(dict(same[1]))
            continue
        src = manifest.engine_dir / spec["file"]
        with tempfile.TemporaryDirectory(dir=manifest.engine_dir, prefix=".build-") as tmp:
            tmp = Path(tmp)
            log(f"{job.component}: preparing graph")
            prepared = prepare_onnx(src, tmp, external_data=bool(spec.get("data_file")), fold=not job.refittable)
            reference = _ort_reference(src) if check_parity else None
            verdict, plan, built_with, build_s = None, None, None, 0.0
            for tier_precision, fp32_layers in job.tiers:
                log(f"{job.component}: building {tier_precision} (fp32 layers: {fp32_layers})")
                t0 = time.perf_counter()
                plan = build_plan(trt, pg_trt, prepared, job.profiles, tier_precision, fp32_layers,
                                  timing_cache, opt_level, job.refittable)
                build_s = time.perf_counter() - t0
                built_with = (tier_precision, fp32_layers)
                if not check_parity:
                    break
                (tmp / "candidate.plan").write_bytes(plan)
                session = _engine_runner(trt, job.component, spec, tmp, "candidate.plan", job.profiles)
                try:
                    verdict = check_engine(job.component, spec["inputs"], job.profiles, model,
                                           session.run, reference)
                finally:
                    session.close()
                if verdict.ok:
                    break
                log(f"{job.component}: refused {tier_precision}/{fp32_layers} engine: {verdict.reason}")
            if check_parity and not verdict.ok:
                raise UserError(f"{job.component}: even the fp32 engine fails the parity check ({verdict.reason})")
        entry = {
            "key": job.key,
            "precision": job.precision,
            "profiles": job.profiles,
            "static": req.static,
            "tensorrt_version": trt.__version__,
            "gpu_name": gpu_name,
            "compute_capability": cc,
            "onnx_sha256": spec["sha256"],
            "plan": f"{TRT_DIR}/{job.key}/{job.component}.plan",
            "size_bytes": len(plan),
            "build_s": round(build_s, 2),
            "opt_level": int(opt_level),
            "parity": verdict.to_dict() if verdict else None,
            "fallback_fp32": built_with[0] != job.precision,
            "fp32_layers": built_with[1],
            "fp32_reason": job.fp32_reason,
            "refittable": job.refittable,
        }
        write_plan(manifest.engine_dir, job.key, job.component, plan, info=entry)
        record_entry(manifest, job.component, entry)
        log(f"{job.component}: engine {job.key} ({built_with[0]}, {len(plan) / 2**20:.1f} MiB, {build_s:.0f} s)")
        used.append(entry)
    return used
