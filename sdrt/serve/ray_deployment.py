"""The service as a Ray Serve deployment (``pip install 'sdrt[ray]'``): the same HTTP API, one engine per replica.

Each replica loads the pipeline, starts its own step-batching engine (its sessions, its queue, its jobs) and
serves the same FastAPI app as ``sdrt serve`` through ``@serve.ingress``; Ray's proxy spreads requests over
the replicas. Ray's whole-call ``@serve.batch`` is not used: batching happens per UNet step inside each
replica, so a replica must be let to hold enough requests to fill its batches.

Sizing, from the service's own settings (:func:`deployment_options`):

* ``max_ongoing_requests`` = 2 x ``max_batch`` per replica: a full UNet batch running, and as many again
  waiting in the engine to join at the next step (an open event stream holds a slot like a waiting request);
* ``max_queued_requests`` = ``max_queue``: requests waiting in the proxy for a replica with room; past it,
  the proxy answers **429** with ``Retry-After`` (``backpressure_config``), as ``sdrt serve`` does when its
  queue is full. A replica's engine still refuses past its own ``max_queue`` with the service's 429;
* autoscaling (``--autoscale MIN:MAX``) on ongoing requests, aiming at ``max_batch`` per replica;
* a health check that fails when the replica's engine is broken (its worker died), so Ray replaces it;
* ``graceful_shutdown_timeout_s`` = ``drain_timeout``: a replica being replaced (rolling update, scale-down)
  gets no new requests and finishes those it holds before its engine closes;
* a request router (:class:`sdrt.serve.ray_router.JobAffinityRouter`) that sends ``GET|DELETE /v1/jobs/{id}``
  and its events to the replica that owns the job (job ids start with the owner's replica id), and everything
  else by Ray's power-of-two-choices.

Two ways in: ``sdrt serve ENGINE_DIR --ray [--replicas N | --autoscale MIN:MAX]`` (:func:`serve_ray`), and
the application builder for ``serve run`` and ``serve deploy`` config files (:func:`app_builder`)::

    applications:
      - name: sdrt
        route_prefix: /
        import_path: sdrt.serve.ray_deployment:app_builder
        args: {engine_dir: /models/sd15, max_batch: 8, max_queue: 64, replicas: 2}
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import threading

from sdrt.errors import MissingDependencyError, UserError
from sdrt.serve.server import ServeConfig, build_engine, model_name

log = logging.getLogger("sdrt.serve")

APP_NAME = "sdrt"
DEPLOYMENT_NAME = "SdrtReplica"
ROUTER = "sdrt.serve.ray_router:JobAffinityRouter"  # imported by Ray in its proxy
REPLICA_HEADER = "x-sdrt-replica"   # which replica answered (its Ray replica id): for logs, tests and load figures
RETRY_AFTER_S = 2                   # Ray's backpressure answer has a fixed Retry-After
# Read by Ray when it starts a node, so set before ray.init (and in the pods' environment on a cluster):
# the proxy answers its own errors in the service's words (proxy_middlewares below)
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "sdrt.serve.ray_deployment:proxy_middlewares"}
# and, for a local instance only, read when ray is imported: without it, Ray binds this machine's external address
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
PROXY_STATUSES = (408, 429, 503)  # what Ray's proxy answers by itself (timeout, backpressure, no replica)
REPLICA_GONE = ("the replica holding this request stopped before it answered (its process died, or it was "
                "replaced); nothing of the request was kept: send it again")


def import_serve():
    try:
        from ray import serve
    except ImportError:
        raise MissingDependencyError("ray", "ray", "sdrt serve --ray") from None
    return serve


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` -> (min, max) replicas, 0 <= MIN <= MAX, MAX >= 1."""
    lo, sep, hi = str(text).partition(":")
    if not (sep and lo.strip().isdigit() and hi.strip().isdigit()) or not 0 <= int(lo) <= int(hi) or int(hi) < 1:
        raise UserError(f"--autoscale {text}: must be MIN:MAX replicas with 0 <= MIN <= MAX and MAX >= 1, e.g. 1:4")
    return int(lo), int(hi)


def deployment_options(config: ServeConfig, replicas: int = 1, autoscale: tuple[int, int] | None = None,
                       num_cpus: float = 1) -> dict:
    """Ray Serve deployment options sized from the service's settings (see the module's docstring)."""
    options = dict(
        name=DEPLOYMENT_NAME,
        max_ongoing_requests=2 * config.max_batch,
        max_queued_requests=config.max_queue,
        backpressure_config={"status_code": 429, "retry_after_s": RETRY_AFTER_S},
        request_router_config={"request_router_class": ROUTER},
        health_check_period_s=5,
        health_check_timeout_s=30,
        graceful_shutdown_wait_loop_s=1,
        graceful_shutdown_timeout_s=config.drain_timeout,
        ray_actor_options={"num_cpus": num_cpus},
    )
    if autoscale is not None:
        options["autoscaling_config"] = {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                         "initial_replicas": max(1, autoscale[0]),
                                         "target_ongoing_requests": config.max_batch}
    else:
        options["num_replicas"] = replicas
    return options


class ReplicaHeader:
    """ASGI middleware: every response says which replica answered it."""

    def __init__(self, app, replica: str):
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.value)]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class ProxyErrors:
    """ASGI middleware in Ray's proxy: what the proxy answers itself, rather than a replica, is worded as the
    service words its errors (``{"error": {"message", "type", "code"}, "detail"}``). Backpressure stays a 429
    with Retry-After; a request whose replica died (the proxy then gives no answer at all, and uvicorn would
    send a bare 500) becomes a 503 that says so, with Retry-After, since another replica can take it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict = {}          # the proxy's own error response, until its body is in
        started = False

        async def relay(message):
            nonlocal started
            if message["type"] == "http.response.start" and message["status"] in PROXY_STATUSES and not any(
                    name.lower() == REPLICA_HEADER.encode() for name, _ in message.get("headers", [])):
                held.update(message, body=b"")
                return
            if held and message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")
                if not message.get("more_body", False):
                    started = True
                    await self._reword(send, held)
                return
            started = True
            await send(message)

        try:
            await self.app(scope, receive, relay)
        except Exception:
            if started:
                raise
            await self._reword(send, held or {"status": None})
            return
        if not started:
            await self._reword(send, held or {"status": None})

    @staticmethod
    async def _reword(send, response: dict) -> None:
        status, text = response["status"], response.get("body", b"").decode("utf-8", "replace").strip()
        keep = [(k, v) for k, v in response.get("headers", []) if k.lower() in (b"retry-after", b"x-request-id")]
        if status not in PROXY_STATUSES:  # no answer from the proxy
            status, message, kind = 503, REPLICA_GONE, "unavailable"
            keep = [h for h in keep if h[0].lower() != b"retry-after"] + [(b"retry-after", b"1")]
        elif status == 429:
            message, kind = f"every replica is busy and the queue for them is full ({text}); retry later", \
                "rate_limit_error"
        else:
            message, kind = text or f"Ray's proxy answered {status}", "unavailable" if status == 503 else "timeout"
        body = json.dumps({"error": {"message": message, "type": kind, "code": status}, "detail": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *keep]})
        await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list:
    """Ray's HTTP proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyErrors)]


class SdrtReplica:
    """One replica: its own pipeline and engine, the service's FastAPI app over them."""

    async def __init__(self, config: dict):
        from ray import serve

        from sdrt.serve.app import Service

        self.config = ServeConfig(**config)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.service = Service(api_key=self.config.api_key(), model_name=model_name(self.config.engine_dir))
        engine = await asyncio.to_thread(build_engine, self.config)  # loading must not stall the replica's loop
        engine.job_id_prefix = f"{self.replica_id}-"
        self.service.attach(engine)
        log.info("replica %s ready: %s (max batch %d)", self.replica_id, self.config.engine_dir, self.config.max_batch)

    def __serve_build_asgi_app__(self):
        from sdrt.serve.app import create_app

        app = create_app(self.service)
        app.add_middleware(ReplicaHeader, replica=self.replica_id)
        return app

    def check_health(self) -> None:
        engine = self.service.engine
        if engine is None or engine.broken:
            raise RuntimeError(engine.broken if engine is not None else "the engine is not loaded")

    async def __del__(self):
        """Ray stopped sending requests and waited for those held (graceful shutdown): close the engine."""
        engine = self.service.engine if hasattr(self, "service") else None
        if engine is not None:
            self.service.draining = True
            await asyncio.to_thread(engine.close, self.config.drain_timeout)
            engine.pipeline.close()
        parent = getattr(super(), "__del__", None)  # the ingress wrapper's ASGI lifespan shutdown
        if parent is not None:
            await parent()


def build_app(config: ServeConfig, replicas: int = 1, autoscale: tuple[int, int] | None = None,
              num_cpus: float = 1):
    """The Ray Serve application: ``serve.run(build_app(ServeConfig("engines/sd15")), route_prefix="/")``."""
    serve = import_serve()
    replica_config = dataclasses.asdict(config)
    if config.backend in ("cpu", "openvino") and "threads" not in config.backend_options:
        # a replica computes on the CPUs Ray gives it, not on every core of the node
        replica_config["backend_options"] = {**config.backend_options, "threads": max(1, int(num_cpus))}
    deployment = serve.deployment(serve.ingress()(SdrtReplica))
    return deployment.options(**deployment_options(config, replicas, autoscale, num_cpus)).bind(replica_config)


def app_builder(args: dict):
    """For ``serve run sdrt.serve.ray_deployment:app_builder engine_dir=...`` and config files' ``import_path``:
    ``args`` holds ServeConfig's fields (engine_dir, max_batch, max_queue, timeout, backend, ...) and, for
    the deployment, ``replicas``, ``autoscale`` ("MIN:MAX") and ``num_cpus`` (per replica). A config file's
    ``deployments:`` section can still override any deployment option."""
    args = dict(args)
    deployment = {k: args.pop(k) for k in ("replicas", "autoscale", "num_cpus") if k in args}
    autoscale = parse_autoscale(deployment["autoscale"]) if deployment.get("autoscale") else None
    config = _config_from_args(args)
    return build_app(config, replicas=int(deployment.get("replicas", 1)), autoscale=autoscale,
                     num_cpus=float(deployment.get("num_cpus", 1)))


def _config_from_args(args: dict) -> ServeConfig:
    """ServeConfig from builder args, which ``serve run KEY=VALUE`` passes as strings."""
    fields = {f.name: f for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise UserError(f"sdrt application args {', '.join(unknown)}: unknown; allowed: "
                        f"{', '.join([*fields, 'replicas', 'autoscale', 'num_cpus'])}")
    if "engine_dir" not in args:
        raise UserError("sdrt application args: engine_dir is required")
    values = {}
    for key, value in args.items():
        kind = str(fields[key].type).split("|")[0].strip()  # "int | None" -> "int"
        if isinstance(value, str) and kind in ("int", "float", "bool"):
            try:
                value = value.lower() in ("1", "true", "yes") if kind == "bool" else {"int": int, "float": float}[kind](value)
            except ValueError:
                raise UserError(f"sdrt application arg {key}={value!r}: must be {kind}") from None
        if isinstance(value, str) and kind == "list":  # loras=a.safetensors:0.8,b.safetensors
            value = [v.strip() for v in value.split(",") if v.strip()]
        values[key] = value
    return ServeConfig(**values)


def serve_ray(config: ServeConfig, replicas: int = 1, autoscale: tuple[int, int] | None = None,
              num_cpus: float = 1) -> int:
    """``sdrt serve --ray``: on the Ray cluster at $RAY_ADDRESS, else on a local instance bound to loopback;
    serves until SIGTERM or Ctrl-C, then removes the application (replicas finish what they hold)."""
    address = os.environ.get("RAY_ADDRESS")
    for key, value in {**PROXY_ENV, **({} if address else LOCAL_ENV)}.items():
        os.environ.setdefault(key, value)
    serve = import_serve()
    import ray

    config.api_key()  # an unset key variable is one line here, before anything starts
    from sdrt.runtime.manifest import Manifest

    Manifest.load(config.engine_dir, verify="none")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_app(config, replicas, autoscale, num_cpus), name=APP_NAME, route_prefix="/")
        log.info("ready: %s on Ray at http://%s:%d/ (%s)", config.engine_dir, config.host, config.port,
                 f"autoscaling {autoscale[0]}..{autoscale[1]} replicas" if autoscale else f"{replicas} replica(s)")
        while not stop.wait(0.5):
            pass
        log.info("stopping: replicas finish the requests they hold (up to %.0f s)", config.drain_timeout)
        serve.delete(APP_NAME)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not address:
            serve.shutdown()
        ray.shutdown()
    return 0
