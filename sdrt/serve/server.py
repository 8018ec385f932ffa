"""``sdrt serve``: the app under uvicorn in one process, loading in the background and draining on SIGTERM.

The listening socket opens first, so ``/healthz`` answers while the engine loads and warms up; ``/readyz``
turns 200 after the warm-up step. On SIGTERM (or Ctrl-C) the service drains: ``/readyz`` and new requests
get 503, accepted requests finish (up to ``drain_timeout`` seconds; what is left is answered 503), then the
process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sdrt.errors import MissingDependencyError, UserError
from sdrt.serve.limits import LIMIT

log = logging.getLogger("sdrt.serve")


@dataclass
class ServeConfig:
    engine_dir: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = LIMIT["max_batch"].default
    max_queue: int = LIMIT["max_queue"].default
    timeout: float = LIMIT["timeout"].default
    backend: str = "cpu"
    api_key_env: str | None = None
    drain_timeout: float = 60.0
    max_steps: int = LIMIT["max_steps"].default
    max_images: int = LIMIT["max_images"].default
    max_pixels: int | None = LIMIT["max_pixels"].default
    warmup: bool = True
    embeddings: list = field(default_factory=list)   # textual-inversion files, FILE[:TOKEN]
    precision: str = "fp32"                           # fp32 | bf16 (sdrt.runtime.precision)
    cache_interval: int | None = None                 # feature caching: the deep UNet every N evaluations
    vae: str = "full"                                 # the final images' decoder: full | tiny
    backend_options: dict = field(default_factory=dict)
    loras: list = field(default_factory=list)   # LoRAs applied at load: "FILE[:SCALE]" or (file, scale) each

    def api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env, "")
        if not key.strip():
            raise UserError(f"--api-key-env {self.api_key_env}: that environment variable is not set or empty")
        return key.strip()


def build_engine(config: ServeConfig):
    """Load the pipeline and start its engine (warm-up included); the pipeline is closed if that fails."""
    from sdrt.runtime import Pipeline
    from sdrt.serve.engine import Engine, Limits

    pipeline = Pipeline(config.engine_dir, backend=config.backend, backend_options=config.backend_options or None,
                        embeddings=config.embeddings, loras=config.loras, precision=config.precision,
                        cache_interval=config.cache_interval, vae=config.vae)
    try:
        engine = Engine(pipeline, max_batch=config.max_batch, max_queue=config.max_queue, timeout=config.timeout,
                        limits=Limits(max_pixels=config.max_pixels, max_steps=config.max_steps,
                                      max_images=config.max_images))
        return engine.start(warmup=config.warmup)
    except BaseException:
        pipeline.close()
        raise


def model_name(engine_dir: str) -> str:
    from sdrt.runtime.manifest import Manifest

    try:
        source = Manifest.load(engine_dir, verify="none").data.get("source", {})
    except UserError:
        source = {}
    return Path(str(source.get("path") or engine_dir)).name


def serve(config: ServeConfig) -> int:
    try:
        import uvicorn
    except ImportError:
        raise MissingDependencyError("uvicorn", "serve", "sdrt serve") from None
    from sdrt.serve.app import Service, create_app

    api_key = config.api_key()
    from sdrt.runtime.manifest import Manifest

    Manifest.load(config.engine_dir, verify="none")  # a bad ENGINE_DIR is one line before anything listens
    service = Service(api_key=api_key, model_name=model_name(config.engine_dir))
    app = create_app(service)
    # http="h11": with uvicorn's httptools protocol every JSON answer reached the client ~45 ms after it was sent
    # (measured on loopback, a 4 KB answer; the body waits on the client's delayed ACK), with h11 ~1 ms.
    server = _draining_server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                                             access_log=False, timeout_graceful_shutdown=5, http="h11"),
                              service, config.drain_timeout)

    def load():
        try:
            service.attach(build_engine(config))
            log.info("ready: %s (max batch %d, queue %d)", config.engine_dir, config.max_batch, config.max_queue)
        except Exception as e:  # the process stays up so /healthz and the log say why; exit with the error
            service.load_error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            log.error("loading %s failed: %s", config.engine_dir, service.load_error)
            server.should_exit = True

    loader = threading.Thread(target=load, name="sdrt-load", daemon=True)
    loader.start()
    try:
        server.run()
    finally:
        loader.join(timeout=1)
        if service.engine is not None:
            service.engine.close(drain_timeout=0)
            service.engine.pipeline.close()
    if service.load_error:
        raise UserError(f"{config.engine_dir}: {service.load_error}")
    if not server.started:
        raise UserError(f"could not listen on {config.host}:{config.port} (in use, or not an address of this machine)")
    return 0


def _draining_server(uvicorn_config, service, drain_timeout: float):
    """uvicorn's Server, except that the first SIGTERM/SIGINT drains the engine before uvicorn stops, and the
    process then exits 0 (uvicorn itself re-raises the signal after its graceful stop)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        _drain_started = False

        def handle_exit(self, sig, frame):
            if self._drain_started:  # a second signal: stop now
                self.force_exit = True
                self.should_exit = True
                return
            self._drain_started = True
            log.info("%s: draining (up to %.0f s)", signal.Signals(sig).name, drain_timeout)
            threading.Thread(target=self._drain, name="sdrt-drain", daemon=True).start()

        def _drain(self):
            service.draining = True
            engine = service.engine
            if engine is not None and not engine.drain(drain_timeout):
                log.warning("drain timeout: answering what is left with 503")
                engine.close(drain_timeout=0)
            self.should_exit = True

    return DrainingServer(uvicorn_config)
