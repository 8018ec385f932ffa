"""Ray Serve request router for the sdrt deployment: a job's calls go to the replica that owns the job.

Each replica keeps its own jobs (their state, events and cancellation live in its engine), and names them
``{replica id}-{uuid}``. ``GET /v1/jobs/{id}``, ``GET /v1/jobs/{id}/events`` and ``DELETE /v1/jobs/{id}``
are routed to that replica; when it is gone (killed, or replaced), any replica answers, with a 404 that says
the job is unknown. Everything else is routed by Ray's power of two choices.

Ray imports this module by name (``request_router_config``) in its proxy and in deployment handles; sdrt
itself never does.
"""

from __future__ import annotations

import pickle
import re
from typing import List, Optional

try:
    from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
    from ray.serve.request_router import PendingRequest, RunningReplica
except ImportError:  # pragma: no cover - only Ray imports this module
    from sdrt.errors import MissingDependencyError

    raise MissingDependencyError("ray", "ray", "the sdrt Ray Serve router") from None

JOB_PATH = re.compile(r"/v1/jobs/([A-Za-z0-9]+)-[0-9a-f]{32}(?:/events)?/?$")
_MARK = b"/v1/jobs/"


def job_owner(pending_request: Optional[PendingRequest]) -> Optional[str]:
    """The owner's replica id when the request is an HTTP call about one job, else None."""
    if pending_request is None or not pending_request.args:
        return None
    arg = pending_request.args[0]
    if isinstance(arg, (bytes, bytearray)):
        if _MARK not in arg:  # most requests: no need to unpickle the proxy's request
            return None
        try:
            arg = pickle.loads(arg)  # the proxy's own StreamingHTTPRequest (ASGI scope)
        except Exception:
            return None
    scope = getattr(arg, "asgi_scope", None)
    if not isinstance(scope, dict):
        return None
    path = scope.get("path", "")
    match = JOB_PATH.search(path[len(scope.get("root_path", "")):] if path else "")
    return match.group(1) if match else None


class JobAffinityRouter(PowerOfTwoChoicesRequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        owner = job_owner(pending_request)
        if owner is not None:
            pending_request.routing_context.should_backoff = True  # the owner is full: wait, don't spin
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == owner:
                    return [[replica]]
        return await super().choose_replicas(candidate_replicas, pending_request)
