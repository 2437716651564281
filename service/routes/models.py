"""``GET /v1/models``: the models requests may name (``model``), and what their workers run."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from .. import models_registry
from ..contracts import ErrorResponse, ModelList, ServedModel
from ..deps import ServicesDep, TenantDep, limit_reads

router = APIRouter(prefix="/v1", tags=["models"])


@router.get(
    "/models",
    response_model=ModelList,
    operation_id="listModels",
    dependencies=[Depends(limit_reads)],
    responses={
        401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
        429: {"model": ErrorResponse, "description": "Too many failed authentications, reads or reads in flight"},
        503: {"model": ErrorResponse, "description": "Redis unreachable"},
    },
)
def list_models(services: ServicesDep, tenant: TenantDep) -> ModelList:
    """The served models, the default first: each one's family, weights, whether it is trained
    (untrained weights make noise, not super-resolution), its default steps and guidance, and
    how many workers serve it now. Identity fields are null until a worker has announced it."""
    default = services.settings.default_model
    models = []
    for found in models_registry.read(services.redis, services.settings.served_models()):
        identity = found.info.model_dump(exclude={"name"}) if found.info is not None else {}
        models.append(ServedModel(name=found.name, default=found.name == default, workers=found.workers, **identity))
    return ModelList(models=models)
