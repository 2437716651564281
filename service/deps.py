"""FastAPI dependencies: the shared services of the app (``service.jobsystem.services``), the
caller's tenant (its API key, with the failed-authentication limits) and a GET's read limits."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import ApiError
from .jobsystem.services import Services
from .request_limits import ReadSlots

DEFAULT_TENANT = "default"
BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}
KEY_PREFIX_CHARS = 8  # a wrong key counts against the bucket of its first characters (keys have 8+)
#: declares the API key in OpenAPI (Swagger's Authorize); errors stay ours (auto_error=False)
api_key_scheme = HTTPBearer(
    auto_error=False, scheme_name="apiKey", description="An API key of MEGASR_API_KEYS: `Authorization: Bearer KEY`"
)


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def client_address(request: Request) -> str:
    """The caller's address, the subject of its failed-auth bucket.

    uvicorn's proxy headers (``--proxy-headers``, ``FORWARDED_ALLOW_IPS``) have already replaced the
    peer by the first untrusted hop of ``X-Forwarded-For`` read from the right, so addresses a client
    prepends itself are never used. IPv6 clients count per /64 (one site's allocation: rotating
    inside it resets nothing); anything that is not an address is hashed (a bounded Redis key)."""
    host = request.client.host if request.client else ""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return "name:" + hashlib.sha256(host.encode()).hexdigest()[:24] if host else "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header, if there is one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def presented_key_subject(services: Services, token: str) -> str:
    """The bucket of a wrong key: a keyed hash of its first :data:`KEY_PREFIX_CHARS` characters. Keyed
    with the configured keys, so Redis never holds a guessable digest of a near-miss (a typo's prefix is
    a real key's prefix); a guesser that rotates addresses keeps spending one prefix's budget."""
    secret = hashlib.sha256("\n".join(sorted(services.tenant_keys)).encode()).digest()
    return hmac.new(secret, token[:KEY_PREFIX_CHARS].encode(), hashlib.sha256).hexdigest()[:32]


def refuse_if_guessing(services: Services, client: str, token: str) -> None:
    """429 for a wrong key once its client's or its key prefix's failed-auth budget is spent.

    Called only after the key was found wrong: a valid key is never refused for failures, so neither
    a neighbour behind the same address (NAT, a proxy) nor a stranger can lock a tenant out."""
    for bucket, subject, what in (
        (services.auth_failures, client, "this address"),
        (services.auth_failures_by_key, presented_key_subject(services, token), "this key"),
    ):
        decision = bucket.peek(subject)
        if not decision.allowed:
            raise ApiError(
                429,
                "too_many_auth_failures",
                f"too many failed authentications from {what}; retry in {decision.retry_after_header} s",
                {"Retry-After": decision.retry_after_header},
            )


def record_auth_failure(services: Services, client: str, token: str) -> None:
    """Count a wrong key against its client and its key prefix."""
    services.auth_failures.take(client)
    services.auth_failures_by_key.take(presented_key_subject(services, token))


#: schemes a client may send instead of Bearer (Replicate's Token, HTTP's registered ones): named
#: back in the 401; any other first word could be a bare key and is never echoed
_OTHER_SCHEMES = frozenset({"token", "basic", "digest", "apikey", "api-key", "key", "negotiate", "hoba"})


def _missing_key_message(request: Request) -> str:
    """Why no key was found: none sent, or one sent in a scheme this API does not take (Replicate's
    ``Token KEY``, HTTP ``Basic``); the scheme is named, the credentials never echoed."""
    scheme = request.headers.get("authorization", "").strip().partition(" ")[0]
    if scheme and scheme.lower() != "bearer":
        if scheme.lower() not in _OTHER_SCHEMES:  # maybe a bare key: never echoed
            return "the Authorization header is not 'Bearer KEY'; this API takes only 'Authorization: Bearer KEY'"
        return (
            f"the Authorization header uses the {scheme.capitalize()} scheme; this API takes only "
            "'Authorization: Bearer KEY' (the same key, with Bearer instead)"
        )
    return "missing API key: send 'Authorization: Bearer KEY'"


def get_tenant(
    request: Request,
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(api_key_scheme)],
) -> str:
    """The tenant of the caller's API key; single-tenant when no keys are configured (allow_anonymous).

    The key is checked first: a valid key is always served. Only a wrong key meets the failed-auth
    limit (429 once spent, else 401, counted); a missing key is a plain 401, never counted."""
    if not services.tenant_keys:
        return DEFAULT_TENANT
    token = credentials.credentials.strip() if credentials is not None else None
    if not token:
        raise ApiError(401, "unauthorized", _missing_key_message(request), BEARER_CHALLENGE)
    tenant = None
    for key, owner in services.tenant_keys.items():  # compare against every key: constant time
        if hmac.compare_digest(key.encode(), token.encode()):
            tenant = owner
    if tenant is not None:
        return tenant
    client = client_address(request)
    refuse_if_guessing(services, client, token)
    record_auth_failure(services, client, token)
    raise ApiError(401, "unauthorized", "invalid API key", BEARER_CHALLENGE)


TenantDep = Annotated[str, Depends(get_tenant)]


def get_read_slots(request: Request) -> ReadSlots:
    return request.app.state.read_slots


async def limit_reads(
    services: ServicesDep, tenant: TenantDep, read_slots: Annotated[ReadSlots, Depends(get_read_slots)]
) -> AsyncIterator[None]:
    """A GET's per-tenant limits: a slot among the tenant's in-flight reads of this process, taken on
    the event loop before the handler holds a pool thread (429 ``too_many_concurrent_reads``), then a
    token of its read bucket (429 ``rate_limited``). The slot is given back when the handler ends."""
    slot = read_slots.acquire(tenant)
    try:
        rate = await run_in_threadpool(services.read_rate.take, tenant)
        if not rate.allowed:
            settings = services.settings
            raise ApiError(
                429,
                "rate_limited",
                f"over {settings.read_rate_limit_per_minute} reads a minute (bursts "
                f"of {settings.read_rate_limit_burst}); retry in {rate.retry_after_header} s",
                {"Retry-After": rate.retry_after_header},
            )
        yield
    finally:
        slot.release()
