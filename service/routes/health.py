"""Liveness (process up) and readiness (Redis and storage reachable; with an in-process worker,
``megasr serve``, that worker ready to take jobs). The readiness body also lists the served
models as their workers announced them (``service.models_registry``)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from .. import local_workers, models_registry
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
    settings = services.settings
    served = settings.served_models()
    workers = [w for name in served for w in local_workers.serving(settings.redis_url, settings.queue_for(name))]
    if workers:  # embedded mode: jobs wait forever unless this process's worker can take them
        live = [w for w in workers if w.live]
        checks["worker"] = "ok" if live else "; ".join(w.describe() for w in workers)
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks,
                         "models": _models(services, served, checks["redis"] == "ok")},
                        status_code=200 if ready else 503)


def _models(services: ServicesDep, served: list[str], redis_ok: bool) -> list[dict]:
    """The served models and what their workers announced (informative: readiness does not
    depend on them, since an API may well start before its workers)."""
    found = None
    if redis_ok:
        try:
            found = {a.name: a for a in models_registry.read(services.redis, served)}
        except Exception:  # Redis went away meanwhile: the checks above say so next time
            found = None
    models = []
    for name in served:
        announced = found.get(name) if found is not None else None
        info = announced.info if announced is not None else None
        models.append({"name": name, "family": info.family if info else None, "trained": info.trained if info else None,
                       "workers": announced.workers if announced is not None else None})
    return models
