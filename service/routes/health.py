"""Liveness (process up) and readiness (Redis and storage reachable; with an in-process worker,
``megasr serve``, that worker ready to take jobs)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from .. import local_workers
from ..deps import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="getLiveness")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", operation_id="getReadiness")
def readyz(services: ServicesDep) -> JSONResponse:
    checks = {}
    try:
        services.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:  # any failure means not ready
        checks["redis"] = f"unreachable: {type(exc).__name__}"
    try:
        services.storage.ping()
        checks["storage"] = "ok"
    except Exception as exc:
        checks["storage"] = f"unreachable: {type(exc).__name__}"
    workers = local_workers.serving(services.settings.redis_url, services.settings.queue_name)
    if workers:  # embedded mode: jobs wait forever unless this process's worker can take them
        live = [w for w in workers if w.live]
        checks["worker"] = "ok" if live else "; ".join(w.describe() for w in workers)
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503)
