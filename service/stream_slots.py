"""Open event streams per tenant and per process: a cap, so that one tenant cannot hold every
connection (and file descriptor) of an API process with ``GET /v1/jobs/{id}/events``.

The counts are per process and in memory: a stream lives in exactly one process, and a count
that dies with its process can never leak. Every slot is taken on the event loop and given back
exactly once (:class:`Slot`), whatever ends the stream.
"""

from __future__ import annotations

from collections import Counter

from .errors import ApiError

#: seconds a refused client is asked to wait: streams end and free slots all the time
RETRY_AFTER_S = 5


class Slot:
    """One open stream's place; :meth:`release` is idempotent."""

    def __init__(self, slots: StreamSlots, tenant: str) -> None:
        self._slots, self.tenant, self._held = slots, tenant, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots._release(self.tenant)


class StreamSlots:
    """At most ``per_tenant`` open streams of a tenant and ``total`` of all tenants."""

    def __init__(self, per_tenant: int, total: int) -> None:
        self.per_tenant, self.total = per_tenant, total
        self._open: Counter[str] = Counter()

    def open_count(self, tenant: str | None = None) -> int:
        return self._open[tenant] if tenant is not None else sum(self._open.values())

    def acquire(self, tenant: str) -> Slot:
        """A slot, or ApiError: 429 when the tenant is at its cap, 503 when the process is full
        (another replica may have room; clients fall back to polling)."""
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        if self._open[tenant] >= self.per_tenant:
            raise ApiError(429, "too_many_streams", f"{self.per_tenant} event streams of this API key are open "
                           "already (MEGASR_MAX_EVENT_STREAMS_PER_TENANT); close one, or poll GET /v1/jobs/{id}",
                           headers)
        if self.open_count() >= self.total:
            raise ApiError(503, "too_many_streams", f"this API process has its {self.total} event streams open "
                           "(MEGASR_MAX_EVENT_STREAMS); retry later, or poll GET /v1/jobs/{id}", headers)
        self._open[tenant] += 1
        return Slot(self, tenant)

    def _release(self, tenant: str) -> None:
        self._open[tenant] -= 1
        if self._open[tenant] <= 0:
            del self._open[tenant]
