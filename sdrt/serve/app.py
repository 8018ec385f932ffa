"""The HTTP application over a step-batching engine: translates HTTP to engine requests and back, nothing more.

Endpoints (``pip install 'sdrt[serve]'``):

    POST   /v1/images                 native request; answers PNGs (base64, with their `parameters`), seeds, timings
    POST   /v1/jobs                   the same request, answered 202 with an id at once
    GET    /v1/jobs/{id}              its state (and its images once completed)
    GET    /v1/jobs/{id}/events       server-sent events: queued (position), started, step k/n, preview, done | error
    DELETE /v1/jobs/{id}              cancel at the next step boundary
    POST   /sdapi/v1/txt2img|img2img  AUTOMATIC1111's API;  GET /sdapi/v1/samplers, /sdapi/v1/sd-models
    GET    /controlnet/model_list, /controlnet/module_list   the ControlNet extension's (alwayson_scripts)
    POST   /v1/images/generations     OpenAI's images API (b64_json)
    GET    /healthz  /readyz  /metrics
    GET    /                          the playground page (plain HTML/CSS/JS from the package; no API key needed)

Status codes: 400/422 bad input (the field named), 401 missing or wrong API key, 404 unknown job, 429 queue
full (Retry-After), 503 draining or not ready, 504 deadline passed, 500 only for a fault of ours or the
engine's. A client that disconnects from a waiting request cancels it. Error bodies are OpenAI's shape,
``{"error": {"message", "type", "code"}}``, with the same message under ``detail``.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
from typing import Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sdrt import __version__
from sdrt.errors import UserError
from sdrt.runtime.images import encode_png
from sdrt.runtime.settings import request_parameters
from sdrt.serve.engine import Engine, Job, JobFailed, NotAccepting, QueueFull
from sdrt.serve.metrics import Metrics
from sdrt.serve.errors import ServiceError
from sdrt.serve.playground import add_playground
from sdrt.serve.schemas import (
    A1111_SAMPLER_NAMES, A1111Request, ImageRequest, OpenAIImageRequest, a1111_submissions, native_settings,
    openai_settings,
)

FAILURE_STATUS = {"timeout": 504, "cancelled": 499, "shutdown": 503, "error": 500}


class Service:
    """What the app serves: the engine (set once loaded, so /healthz answers while it loads), its metrics, the
    API key, and whether it drains."""

    def __init__(self, engine: Engine | None = None, *, metrics: Metrics | None = None, api_key: str | None = None,
                 model_name: str = ""):
        self.metrics = metrics or Metrics()
        self.api_key = api_key
        self.model_name = model_name
        self.draining = False
        self.load_error: str | None = None
        self.engine: Engine | None = None
        if engine is not None:
            self.attach(engine)

    def attach(self, engine: Engine) -> None:
        engine.observer = self.metrics
        self.engine = engine

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.ready and not self.draining

    def require_engine(self) -> Engine:
        if self.draining:
            raise ServiceError(503, "the service is draining (shutting down); send the request elsewhere", "unavailable")
        if self.engine is None or not self.engine.ready:
            why = self.load_error or "the engine is still loading"
            raise ServiceError(503, f"not ready: {why}", "unavailable", {"Retry-After": "5"})
        return self.engine

    def default_scheduler(self) -> str:
        from sdrt.runtime.schedulers import scheduler_name_for_config

        return scheduler_name_for_config(self.engine.pipeline.scheduler_config)


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}, "detail": message},
                        status_code=status, headers=headers)


def _field_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            parts.append(f"body: not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
            continue
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="sdrt", version=__version__,
                  description="Stable Diffusion with step-level batching across requests")
    app.state.service = service

    @app.exception_handler(ServiceError)
    async def _service_error(request, exc: ServiceError):
        if exc.status in (400, 429, 503):
            service.metrics.rejected()
        return _error(exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(UserError)
    async def _user_error(request, exc: UserError):  # a bad setting, found while translating or checking it
        service.metrics.rejected()
        return _error(400, str(exc), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        service.metrics.rejected()
        return _error(422, _field_message(exc), "invalid_request_error")

    async def authorize(request: Request) -> None:
        if service.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), service.api_key.encode()):
            raise ServiceError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error",
                               {"WWW-Authenticate": "Bearer"})

    api = [Depends(authorize)]

    # -- operations ---------------------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz():
        broken = service.engine.broken if service.engine is not None else service.load_error
        if broken:
            return _error(503, broken, "unavailable")
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not service.ready:
            why = "draining" if service.draining else service.load_error or "loading"
            return _error(503, f"not ready: {why}", "unavailable")
        waiting, running = service.engine.counts()
        return {"status": "ready", "waiting": waiting, "running": running}

    @app.get("/metrics")
    async def metrics():
        body, content_type = service.metrics.exposition()
        return Response(body, media_type=content_type)

    # -- native -------------------------------------------------------------------------------------------------
    @app.post("/v1/images", dependencies=api)
    async def images(body: ImageRequest, request: Request):
        engine = service.require_engine()
        jobs = _submit(engine, [native_settings(body, engine.pipeline)], body.timeout, tag="native")
        await _wait(request, engine, jobs)
        return await _completed(jobs[0])

    @app.post("/v1/jobs", dependencies=api, status_code=202)
    async def create_job(body: ImageRequest):
        engine = service.require_engine()
        job = _submit(engine, [native_settings(body, engine.pipeline)], body.timeout, body.preview_every,
                      tag="jobs")[0]
        return {"id": job.id, "state": job.state.value, "events": f"/v1/jobs/{job.id}/events"}

    def _job(job_id: str) -> Job:
        job = service.engine.get(job_id) if service.engine is not None else None
        if job is None:
            raise ServiceError(404, f"job {job_id!r}: no such job (unknown, or forgotten after it finished)",
                               "not_found")
        return job

    @app.get("/v1/jobs/{job_id}", dependencies=api)
    async def get_job(job_id: str):
        job = _job(job_id)
        info = job.describe()
        if job.outcome == "completed":
            info.update(await _completed(job))
        return info

    @app.delete("/v1/jobs/{job_id}", dependencies=api, status_code=202)
    async def cancel_job(job_id: str):
        job = _job(job_id)
        if job.done:
            raise ServiceError(409, f"job {job_id!r} already finished ({job.state})", "conflict")
        service.engine.cancel(job_id)
        return {"id": job.id, "state": job.state.value, "cancel_requested": True}

    @app.get("/v1/jobs/{job_id}/events", dependencies=api)
    async def job_events(job_id: str):
        job = _job(job_id)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        unsubscribe = job.subscribe(lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))

        async def stream():
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(queue.get(), timeout=15)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    if event["event"] == "done":
                        event = {**event, **await _completed(job)}
                    yield f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"
                    if event["event"] in ("done", "error"):
                        return
            finally:
                unsubscribe()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- AUTOMATIC1111 ------------------------------------------------------------------------------------------
    async def a1111(body: A1111Request, request: Request, img2img: bool):
        engine = service.require_engine()
        submissions, seeds = a1111_submissions(body, img2img, engine.pipeline)
        jobs = _submit(engine, submissions, None, tag="a1111")
        await _wait(request, engine, jobs)
        answers = [await _completed(job) for job in jobs]
        first = jobs[0].req
        infotexts = [text for a in answers for text in a["parameters"]]
        info = {
            "prompt": body.prompt, "all_prompts": [body.prompt] * len(jobs),
            "negative_prompt": body.negative_prompt or "", "all_negative_prompts": [body.negative_prompt or ""] * len(jobs),
            "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(jobs),
            "subseed_strength": 0, "width": first.width, "height": first.height,
            "sampler_name": body.sampler_name or body.sampler_index, "cfg_scale": first.guidance,
            "steps": first.steps, "batch_size": body.batch_size, "restore_faces": False,
            "face_restoration_model": None, "sd_model_name": service.model_name, "sd_model_hash": None,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": first.strength if img2img else None, "extra_generation_params": {},
            "index_of_first_image": 0, "infotexts": infotexts, "styles": [], "clip_skip": 1,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "is_using_inpainting_conditioning": False,
            "version": f"sdrt {__version__}",
        }
        parameters = body.model_dump()
        if img2img:
            parameters["init_images"] = None
        return {"images": [image for a in answers for image in a["images"]], "parameters": parameters,
                "info": json.dumps(info)}

    @app.post("/sdapi/v1/txt2img", dependencies=api)
    async def a1111_txt2img(body: A1111Request, request: Request):
        return await a1111(body, request, img2img=False)

    @app.post("/sdapi/v1/img2img", dependencies=api)
    async def a1111_img2img(body: A1111Request, request: Request):
        return await a1111(body, request, img2img=True)

    @app.get("/sdapi/v1/samplers", dependencies=api)
    async def a1111_samplers():
        return [{"name": name, "aliases": [], "options": {}} for name in A1111_SAMPLER_NAMES]

    @app.get("/sdapi/v1/sd-models", dependencies=api)
    async def a1111_models():
        return [{"title": service.model_name, "model_name": service.model_name, "hash": None, "sha256": None,
                 "filename": service.model_name, "config": None}]

    @app.get("/controlnet/model_list", dependencies=api)
    async def controlnet_models():
        return {"model_list": list(service.require_engine().pipeline.controlnets)}

    @app.get("/controlnet/module_list", dependencies=api)
    async def controlnet_modules():
        from sdrt.runtime.control import PREPROCESSORS

        return {"module_list": list(PREPROCESSORS)}

    # -- OpenAI -------------------------------------------------------------------------------------------------
    @app.post("/v1/images/generations", dependencies=api)
    async def openai_generations(body: OpenAIImageRequest, request: Request):
        engine = service.require_engine()
        settings = openai_settings(body)
        jobs = _submit(engine, [settings], None, tag="openai")
        await _wait(request, engine, jobs)
        answer = await _completed(jobs[0])
        return {"created": int(time.time()), "data": [{"b64_json": image, "revised_prompt": None}
                                                      for image in answer["images"]],
                "output_format": "png", "size": f"{jobs[0].req.width}x{jobs[0].req.height}"}

    # -- helpers ------------------------------------------------------------------------------------------------
    def _submit(engine: Engine, submissions: Sequence[dict], timeout, preview_every: int = 0,
                tag: str = "") -> list[Job]:
        try:
            return engine.submit_many(submissions, timeout=timeout, preview_every=preview_every, tag=tag)
        except QueueFull as e:
            raise ServiceError(429, str(e), "rate_limit_error", {"Retry-After": str(e.retry_after)}) from None
        except NotAccepting as e:
            raise ServiceError(503, str(e), "unavailable") from None

    async def _wait(request: Request, engine: Engine, jobs: Sequence[Job]) -> None:
        """Wait for every job's final answer; a client that goes away cancels them."""
        loop = asyncio.get_running_loop()
        pending = {job.id for job in jobs}
        all_done = loop.create_future()

        def on_event(event):
            if event["event"] in ("done", "error"):
                loop.call_soon_threadsafe(_mark, event["id"])

        def _mark(job_id):
            pending.discard(job_id)
            if not pending and not all_done.done():
                all_done.set_result(None)

        unsubscribes = [job.subscribe(on_event) for job in jobs]
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({all_done, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not all_done.done():  # the client went away
                for job in jobs:
                    engine.cancel(job.id)
                raise ServiceError(499, "client closed the request; cancelled", "cancelled")
        finally:
            gone.cancel()
            for unsubscribe in unsubscribes:
                unsubscribe()
        for job in jobs:
            if job.error is not None:
                failed: JobFailed = job.error
                raise ServiceError(FAILURE_STATUS.get(failed.outcome, 500), failed.message, failed.outcome)

    async def _completed(job: Job) -> dict:
        """The answer of a completed job (PNG encoding cached on the job, done off the event loop)."""
        cached = getattr(job, "_answer_cache", None)
        if cached is None:
            cached = await asyncio.to_thread(_encode, job)
            job._answer_cache = cached
        return cached

    def _encode(job: Job) -> dict:
        t0 = time.perf_counter()
        req, result = job.req, job.result
        scheduler = service.default_scheduler()
        images, parameters = [], []
        for i, image in enumerate(result.images):
            params = request_parameters(req, scheduler, service.model_name, i)
            parameters.append(params)
            images.append(base64.b64encode(encode_png(image, params)).decode("ascii"))
        seconds = time.perf_counter() - t0
        service.metrics.stage("response", seconds)
        timings = {k: v for k, v in result.timings.items() if k != "unet_step_ms"}
        timings["unet_evaluations"] = len(result.timings["unet_step_ms"])
        timings["response_ms"] = seconds * 1e3
        return {"images": images, "seeds": result.seeds, "parameters": parameters, "timings": timings}

    add_playground(app, service)
    return app


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was already read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
