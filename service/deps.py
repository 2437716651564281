"""FastAPI dependencies: the shared services of the app and the caller's tenant."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Annotated

import redis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .config import Settings
from .errors import ApiError
from .jobs import JobStore
from .queue import JobQueue
from .rate_limit import TokenBucket
from .storage import Storage

DEFAULT_TENANT = "default"
BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}
#: declares the API key in OpenAPI (Swagger's Authorize); errors stay ours (auto_error=False)
api_key_scheme = HTTPBearer(auto_error=False, scheme_name="apiKey",
                            description="An API key of MEGASR_API_KEYS: `Authorization: Bearer KEY`")


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    storage: Storage
    jobs: JobStore
    #: the RQ queue of every served model (``Settings.served_models``), by model name
    queues: dict[str, JobQueue]
    tenant_keys: dict[str, str]
    #: submissions per tenant (MEGASR_RATE_LIMIT_PER_MINUTE refill, MEGASR_RATE_LIMIT_BURST at once)
    request_rate: TokenBucket = field(init=False)
    #: wrong keys per client address (MEGASR_AUTH_FAILURES_PER_MINUTE)
    auth_failures: TokenBucket = field(init=False)

    def __post_init__(self) -> None:
        settings = self.settings
        self.request_rate = TokenBucket(self.redis, "megasr:bucket:submit", settings.rate_limit_per_minute,
                                        settings.rate_limit_burst)
        self.auth_failures = TokenBucket(self.redis, "megasr:bucket:authfail", settings.auth_failures_per_minute,
                                         settings.auth_failures_per_minute)

    @property
    def queue(self) -> JobQueue:
        """The default model's queue. A worker's own is ``queue_for(settings.worker_model)``."""
        return self.queue_for(self.settings.default_model)

    def queue_for(self, model: str) -> JobQueue:
        """The queue of a model's jobs, served here or not: the reaper and the sweeper of any
        process put a job back on its own model's queue (``Settings.queue_for``)."""
        queue = self.queues.get(model)
        if queue is None:
            queue = self.queues.setdefault(model, JobQueue(self.redis, self.settings.queue_for(model),
                                                           self.settings.job_timeout_s))
        return queue


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def client_address(request: Request) -> str:
    """The caller's address: the peer, or what a trusted proxy forwarded (uvicorn's proxy headers)."""
    return request.client.host if request.client else "unknown"


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header, if there is one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def refuse_if_guessing(services: Services, client: str) -> None:
    """429 for a client whose failed-authentication budget is spent, before any key is compared."""
    decision = services.auth_failures.peek(client)
    if not decision.allowed:
        raise ApiError(429, "too_many_auth_failures",
                       f"too many failed authentications from this address; retry in {decision.retry_after_header} s",
                       {"Retry-After": decision.retry_after_header})


def record_auth_failure(services: Services, client: str) -> None:
    services.auth_failures.take(client)


def get_tenant(
    request: Request, services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(api_key_scheme)],
) -> str:
    """The tenant of the caller's API key; single-tenant when no keys are configured (allow_anonymous)."""
    if not services.tenant_keys:
        return DEFAULT_TENANT
    token = credentials.credentials.strip() if credentials is not None else None
    if not token:
        raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer KEY'", BEARER_CHALLENGE)
    client = client_address(request)
    refuse_if_guessing(services, client)
    tenant = None
    for key, owner in services.tenant_keys.items():  # compare against every key: constant time
        if hmac.compare_digest(key.encode(), token.encode()):
            tenant = owner
    if tenant is None:
        record_auth_failure(services, client)
        raise ApiError(401, "unauthorized", "invalid API key", BEARER_CHALLENGE)
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]
