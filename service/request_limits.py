"""In-flight reads per tenant and per process: a cap, so that one tenant's slow or numerous GETs
cannot hold every thread of the API's pool (``healthz``'s and every other tenant's too).

The counts are per process and in memory: a request runs in exactly one process, and a count that
dies with its process cannot leak. The rate of reads is a Redis token bucket (``service.rate_limit``).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from .errors import ApiError

#: seconds a refused client is asked to wait: reads end and free their slot within a moment
RETRY_AFTER_S = 1


class Slot:
    """One held place of a tenant in a :class:`TenantSlots`; :meth:`release` is idempotent."""

    def __init__(self, slots: TenantSlots, tenant: str) -> None:
        self._slots, self.tenant, self._held = slots, tenant, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots._release(self.tenant)


class TenantSlots:
    """Places held per tenant in this process (reads in flight, open event streams); the caller's
    ``refuse`` decides from the tenant's and the process's counts whether one more may be taken."""

    def __init__(self) -> None:
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()  # taken on the event loop today; a lock keeps any caller correct

    def count(self, tenant: str | None = None) -> int:
        """The tenant's places, or all tenants' with ``None``."""
        return self._held[tenant] if tenant is not None else sum(self._held.values())

    def take(self, tenant: str, refuse: Callable[[int, int], None]) -> Slot:
        """A place, unless ``refuse(tenant's count, process's count)`` raises."""
        with self._lock:
            refuse(self._held[tenant], sum(self._held.values()))
            self._held[tenant] += 1
        return Slot(self, tenant)

    def _release(self, tenant: str) -> None:
        with self._lock:
            self._held[tenant] -= 1
            if self._held[tenant] <= 0:
                del self._held[tenant]


class ReadSlots:
    """At most ``per_tenant`` reads of one tenant in flight at once."""

    def __init__(self, per_tenant: int) -> None:
        if per_tenant < 1:
            raise ValueError("a tenant needs room for at least one read")
        self.per_tenant = per_tenant
        self._slots = TenantSlots()

    def in_flight(self, tenant: str) -> int:
        return self._slots.count(tenant)

    def acquire(self, tenant: str) -> Slot:
        """A slot, or 429 ``too_many_concurrent_reads`` when the tenant has ``per_tenant`` in flight."""
        return self._slots.take(tenant, self._refuse)

    def _refuse(self, tenant_count: int, _process_count: int) -> None:
        if tenant_count >= self.per_tenant:
            raise ApiError(
                429,
                "too_many_concurrent_reads",
                f"{self.per_tenant} requests of this API key are in flight already "
                "(MEGASR_MAX_CONCURRENT_READS_PER_TENANT); retry when one has answered",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
