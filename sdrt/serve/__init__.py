"""Serving (production, no torch): the step-batching engine, the HTTP service over it, its Ray deployment.

* :mod:`sdrt.serve.batching` - the step scheduler: which requests share the next UNet call (pure logic);
* :mod:`sdrt.serve.engine` - the engine: queue, one worker, per-request state, deadlines, cancellation;
* :mod:`sdrt.serve.app` - the FastAPI application (``pip install 'sdrt[serve]'``): native, A1111 and OpenAI
  endpoints, job events, metrics;
* :mod:`sdrt.serve.server` - ``sdrt serve``: uvicorn in one process, draining on SIGTERM;
* :mod:`sdrt.serve.playground` - the page at ``GET /`` (``static/``: plain HTML, CSS and JavaScript);
* :mod:`sdrt.serve.ray_deployment` - ``sdrt serve --ray`` (``pip install 'sdrt[ray]'``): the same app as a Ray
  Serve deployment, one engine per replica; :mod:`sdrt.serve.ray_router` sends a job's calls to its replica.
"""

from sdrt.serve.engine import Engine, Job, JobFailed, JobResult, Limits, NotAccepting, QueueFull

__all__ = ["Engine", "Job", "JobFailed", "JobResult", "Limits", "NotAccepting", "QueueFull"]
