"""Open event streams per tenant and per process: a cap, so that one tenant cannot hold every
connection (and file descriptor) of an API process with ``GET /v1/jobs/{id}/events``.

The counts are per process and in memory: a stream lives in exactly one process, and a count
that dies with its process can never leak. Every slot is taken on the event loop and given back
exactly once (``request_limits.Slot``), whatever ends the stream.
"""

from __future__ import annotations

from .errors import ApiError
from .request_limits import Slot, TenantSlots

#: seconds a refused client is asked to wait: streams end and free slots all the time
RETRY_AFTER_S = 5


class StreamSlots:
    """At most ``per_tenant`` open streams of a tenant and ``total`` of all tenants."""

    def __init__(self, per_tenant: int, total: int) -> None:
        self.per_tenant, self.total = per_tenant, total
        self._slots = TenantSlots()

    def open_count(self, tenant: str | None = None) -> int:
        return self._slots.count(tenant)

    def acquire(self, tenant: str) -> Slot:
        """A slot, or ApiError: 429 when the tenant is at its cap, 503 when the process is full
        (another replica may have room; clients fall back to polling)."""
        return self._slots.take(tenant, self._refuse)

    def _refuse(self, tenant_count: int, process_count: int) -> None:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        if tenant_count >= self.per_tenant:
            raise ApiError(
                429,
                "too_many_streams",
                f"{self.per_tenant} event streams of this API key are open "
                "already (MEGASR_MAX_EVENT_STREAMS_PER_TENANT); close one, or poll GET /v1/jobs/{id}",
                headers,
            )
        if process_count >= self.total:
            raise ApiError(
                503,
                "too_many_streams",
                f"this API process has its {self.total} event streams open "
                "(MEGASR_MAX_EVENT_STREAMS); retry later, or poll GET /v1/jobs/{id}",
                headers,
            )
