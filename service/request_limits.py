"""In-flight reads per tenant and per process: a cap, so that one tenant's slow or numerous GETs
cannot hold every thread of the API's pool (``healthz``'s and every other tenant's too).

The counts are per process and in memory: a request runs in exactly one process, and a count that
dies with its process cannot leak. The rate of reads is a Redis token bucket (``service.rate_limit``).
"""

from __future__ import annotations

import threading
from collections import Counter

from .errors import ApiError

#: seconds a refused client is asked to wait: reads end and free their slot within a moment
RETRY_AFTER_S = 1


class ReadSlot:
    """One in-flight read's place; :meth:`release` is idempotent."""

    def __init__(self, slots: ReadSlots, tenant: str) -> None:
        self._slots, self.tenant, self._held = slots, tenant, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots._release(self.tenant)


class ReadSlots:
    """At most ``per_tenant`` reads of one tenant in flight at once."""

    def __init__(self, per_tenant: int) -> None:
        if per_tenant < 1:
            raise ValueError("a tenant needs room for at least one read")
        self.per_tenant = per_tenant
        self._in_flight: Counter[str] = Counter()
        self._lock = threading.Lock()  # taken on the event loop today; a lock keeps any caller correct

    def in_flight(self, tenant: str) -> int:
        return self._in_flight[tenant]

    def acquire(self, tenant: str) -> ReadSlot:
        """A slot, or 429 ``too_many_concurrent_reads`` when the tenant has ``per_tenant`` in flight."""
        with self._lock:
            if self._in_flight[tenant] >= self.per_tenant:
                raise ApiError(429, "too_many_concurrent_reads",
                               f"{self.per_tenant} requests of this API key are in flight already "
                               "(MEGASR_MAX_CONCURRENT_READS_PER_TENANT); retry when one has answered",
                               {"Retry-After": str(RETRY_AFTER_S)})
            self._in_flight[tenant] += 1
        return ReadSlot(self, tenant)

    def _release(self, tenant: str) -> None:
        with self._lock:
            self._in_flight[tenant] -= 1
            if self._in_flight[tenant] <= 0:
                del self._in_flight[tenant]
