"""The playground page at ``GET /``: plain HTML, CSS and JavaScript shipped in the package (``static/``).

No build step, no CDN, nothing fetched from elsewhere (the Content-Security-Policy says so to the browser):
the page drives the native API as any client would, ``POST /v1/jobs`` then the job's event stream, read with
``fetch()`` so that an ``Authorization`` header can go with it. The page itself needs no API key; what it
knows of the service (defaults, limits, schedulers, whether a key is needed) is written into it as JSON.
"""

from __future__ import annotations

import json
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response

from sdrt.runtime.control import CONTROLNET
from sdrt.runtime.pipeline import DEFAULT_GUIDANCE
from sdrt.runtime.schedulers import SCHEDULER_NAMES
from sdrt.serve.errors import ServiceError

ASSETS = {"playground.css": "text/css; charset=utf-8", "playground.js": "text/javascript; charset=utf-8"}
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
PAGE_STEPS = 25  # the page's default: enough for a clean picture on most models, short enough to watch


def _asset(name: str) -> str:
    return resources.files("sdrt.serve").joinpath("static", name).read_text(encoding="utf-8")


def page_config(service) -> dict:
    """What the page needs to know: the model's defaults, this service's limits (blank while loading) and the
    engine's ControlNets and T2I-Adapters (name, kind) for its control picture."""
    config = {"model": service.model_name, "api_key_required": service.api_key is not None,
              "schedulers": list(SCHEDULER_NAMES), "default_scheduler": None, "steps": PAGE_STEPS,
              "guidance": DEFAULT_GUIDANCE, "height": None, "width": None, "size_multiple": 8,
              "max_steps": None, "max_images": None, "max_pixels": None, "controlnets": []}
    engine = service.engine
    if engine is not None:
        m = engine.pipeline.model
        limits = engine.limits
        config.update(default_scheduler=service.default_scheduler(), height=m.default_height, width=m.default_width,
                      size_multiple=m.size_multiple, max_steps=limits.max_steps, max_images=limits.max_images,
                      max_pixels=limits.max_pixels or 4 * m.default_height * m.default_width)
        config["steps"] = min(PAGE_STEPS, limits.max_steps)
        config["controlnets"] = [{"name": name, "kind": record.get("kind", CONTROLNET)}
                                 for name, record in getattr(engine.pipeline, "controlnets", {}).items()]
    return config


def add_playground(app: FastAPI, service) -> None:
    @app.get("/", include_in_schema=False)
    async def playground():
        # "<" escaped so that no value can close the <script> element the JSON sits in
        data = json.dumps(page_config(service)).replace("<", "\\u003c")
        return HTMLResponse(_asset("index.html").replace("__SDRT_CONFIG__", data), headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in ASSETS:
            raise ServiceError(404, f"static/{name}: no such file (there are {', '.join(sorted(ASSETS))})",
                               "not_found")
        return Response(_asset(name), media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})
