"""FastAPI dependencies: the shared services of the app and the caller's tenant."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

import redis
from fastapi import Depends, Request

from .config import Settings
from .errors import ApiError
from .jobs import JobStore
from .queue import JobQueue
from .storage import Storage

DEFAULT_TENANT = "default"


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    storage: Storage
    jobs: JobStore
    queue: JobQueue
    tenant_keys: dict[str, str]


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_tenant(request: Request, services: ServicesDep) -> str:
    """The tenant of the caller's API key; single-tenant when no keys are configured."""
    if not services.tenant_keys:
        return DEFAULT_TENANT
    challenge = {"WWW-Authenticate": "Bearer"}
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer KEY'", challenge)
    token = token.strip()
    tenant = None
    for key, owner in services.tenant_keys.items():  # compare against every key: constant time
        if hmac.compare_digest(key.encode(), token.encode()):
            tenant = owner
    if tenant is None:
        raise ApiError(401, "unauthorized", "invalid API key", challenge)
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]
