"""Liveness (process up) and readiness (Redis writable, storage writable with room; with an
in-process worker, ``megasr serve``, that worker ready to take jobs). The readiness body also
lists the served models as their workers announced them (``service.models_registry``).

Both are ``async`` and take no dependency that FastAPI would run on the thread pool (a sync
dependency such as ``ServicesDep`` would): one tenant filling that pool with slow calls must not
make a healthy pod fail its probes. The checks themselves are in ``service.probes``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .. import local_workers
from ..probes import Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="getLiveness")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", operation_id="getReadiness")
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    if getattr(state, "readiness", None) is None:
        state.readiness = Readiness(state.services)
    checks, announced = await state.readiness.checks()
    checks = dict(checks)
    settings = state.services.settings
    served = settings.served_models()
    workers = [w for name in served for w in local_workers.serving(settings.redis_url, settings.queue_for(name))]
    if workers:  # embedded mode: jobs wait forever unless this process's worker can take them
        live = [w for w in workers if w.live]
        checks["worker"] = "ok" if live else "; ".join(w.describe() for w in workers)
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks, "models": _models(served, announced)},
        status_code=200 if ready else 503,
    )


def _models(served: list[str], found: dict[str, Any] | None) -> list[dict]:
    """The served models and what their workers announced (informative: readiness does not
    depend on them, since an API may well start before its workers)."""
    models = []
    for name in served:
        announced = found.get(name) if found is not None else None
        info = announced.info if announced is not None else None
        models.append(
            {
                "name": name,
                "family": info.family if info else None,
                "trained": info.trained if info else None,
                "workers": announced.workers if announced is not None else None,
            }
        )
    return models
