"""Serving (production, no torch): the step-batching engine, the HTTP service over it, its Ray deployment.

* :mod:`sdrt.serve.batching` - the step scheduler: which requests share the next UNet call (pure logic);
* :mod:`sdrt.serve.engine` - the engine: queue, one worker, per-request state, deadlines, cancellation;
* :mod:`sdrt.serve.app` - the FastAPI application (``pip install 'sdrt[serve]'``): native, A1111 and OpenAI
  endpoints, job events, metrics;
* :mod:`sdrt.serve.server` - ``sdrt serve``: uvicorn in one process, draining on SIGTERM.
"""

from sdrt.serve.engine import Engine, Job, JobFailed, JobResult, Limits, NotAccepting, QueueFull

__all__ = ["Engine", "Job", "JobFailed", "JobResult", "Limits", "NotAccepting", "QueueFull"]
