"""Prometheus metrics for the service, named as inference servers name theirs (``sdrt_`` prefix).

    sdrt_requests_total{outcome}              completed | cancelled | timeout | error | shutdown | rejected
    sdrt_num_requests_waiting                 queued, not yet admitted
    sdrt_num_requests_running                 being denoised or decoded
    sdrt_request_queue_time_seconds           submit -> admission
    sdrt_e2e_request_latency_seconds          submit -> final answer (completed requests)
    sdrt_time_to_first_step_seconds           submit -> first UNet step done
    sdrt_step_duration_seconds                one batched UNet call
    sdrt_unet_batch_size                      UNet samples per call (a guided image counts twice)
    sdrt_unet_batch_images                    images per UNet call
    sdrt_stage_duration_seconds{stage}        text_encoder | vae_encoder | vae_decoder | response (PNG + JSON)

One registry per service, so several services (tests) live in one process.
"""

from __future__ import annotations

from sdrt.errors import MissingDependencyError
from sdrt.serve.engine import Observer
from sdrt.serve.jobs import OUTCOMES

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics(Observer):
    def __init__(self):
        try:
            import prometheus_client as prom
        except ImportError:
            raise MissingDependencyError("prometheus-client", "serve", "the service's metrics") from None
        self._prom = prom
        prom.disable_created_metrics()  # the *_created series only add noise to every scrape
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("sdrt_requests", "Requests by final outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # every outcome shows, at 0, from the start
        self.waiting = prom.Gauge("sdrt_num_requests_waiting", "Requests queued, not yet admitted", registry=r)
        self.running = prom.Gauge("sdrt_num_requests_running", "Requests being denoised or decoded", registry=r)
        self.queue_time = prom.Histogram("sdrt_request_queue_time_seconds", "Submit to admission",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = prom.Histogram("sdrt_e2e_request_latency_seconds", "Submit to final answer, completed requests",
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.first_step_time = prom.Histogram("sdrt_time_to_first_step_seconds", "Submit to the first UNet step",
                                              buckets=_LATENCY_BUCKETS, registry=r)
        self.step_time = prom.Histogram("sdrt_step_duration_seconds", "One batched UNet call",
                                        buckets=_STEP_BUCKETS, registry=r)
        self.batch_size = prom.Histogram("sdrt_unet_batch_size", "UNet samples per call (guided images count twice)",
                                         buckets=_BATCH_BUCKETS, registry=r)
        self.batch_images = prom.Histogram("sdrt_unet_batch_images", "Images per UNet call",
                                           buckets=_BATCH_BUCKETS, registry=r)
        self.stage_time = prom.Histogram("sdrt_stage_duration_seconds", "Duration of one call of a stage", ["stage"],
                                         buckets=_LATENCY_BUCKETS, registry=r)

    # -- Observer ------------------------------------------------------------------------------------------------
    def finished(self, job) -> None:
        self.requests.labels(job.outcome).inc()
        if "queue_ms" in job.timings:
            self.queue_time.observe(job.timings["queue_ms"] / 1e3)
        if job.outcome == "completed":
            self.e2e.observe(job.timings["total_ms"] / 1e3)

    def first_step(self, seconds: float) -> None:
        self.first_step_time.observe(seconds)

    def unet_call(self, images: int, samples: int, seconds: float) -> None:
        self.step_time.observe(seconds)
        self.batch_size.observe(samples)
        self.batch_images.observe(images)

    def stage(self, stage: str, seconds: float) -> None:
        self.stage_time.labels(stage).observe(seconds)

    def counts(self, waiting: int, running: int) -> None:
        self.waiting.set(waiting)
        self.running.set(running)

    # -- the HTTP side -------------------------------------------------------------------------------------------
    def rejected(self) -> None:
        self.requests.labels("rejected").inc()

    def exposition(self) -> tuple[bytes, str]:
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST
