"""Readiness checks that no tenant's work can delay, and that check what can actually fail.

``/readyz`` must answer within the orchestrator's probe timeout however busy the API is, so
nothing here touches the thread pool that request handlers share (40 slots, which one tenant's
slow calls can fill). Redis is checked through ``redis.asyncio`` on the event loop; storage,
which has only blocking clients, on a small executor of its own with a hard timeout, and never
more than one storage check per app at a time (a hung store cannot pile up threads).

What is checked:

* Redis is *writable*: a ``SET`` of a probe key with a 10 s TTL, so an out-of-memory Redis
  (``maxmemory`` with ``noeviction``) or a read-only replica after a failover reads as not ready;
* local storage has at least ``MEGASR_STORAGE_MIN_FREE_MB`` free and takes a write;
* S3 answers ``HEAD bucket`` on every check, and takes a tiny write at most every 30 s (a PUT
  per probe per replica would be billed; S3 has no free space to measure).

Concurrent probes share one check, and its result is reused for a second, so a flood of
``/readyz`` requests (unauthenticated, like every probe) costs Redis and storage at most about
one check a second per app.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import redis.asyncio

from . import models_registry
from .errors import redis_refusal
from .jobsystem.services import Services
from .storage import LocalStorage, StorageFull

#: longest any one check may take: under the API's probe timeout (3 s in k8s/base/api.yaml)
CHECK_TIMEOUT_S = 2.0
#: how long a check's result answers later probes
CACHE_S = 1.0
#: how often an S3 store gets a probe write (in between: HEAD bucket)
S3_WRITE_EVERY_S = 30.0
MIB = 2**20
#: the storage key written (then deleted) by the write probes, one per process
PROBE_KEY = f".readyz/{socket.gethostname()}-{os.getpid()}"
#: the Redis key of the write probe; it expires by itself
REDIS_PROBE_KEY = f"megasr:readyz:{socket.gethostname()}:{os.getpid()}"

# Its own threads: the handlers' shared pool may be full of one tenant's calls.
_EXECUTOR = ThreadPoolExecutor(max_workers=4, thread_name_prefix="megasr-readyz")


async def check_redis(url: str) -> str:
    """ "ok", or why Redis would not take a job now (unreachable, or refusing writes)."""
    client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=CHECK_TIMEOUT_S, socket_timeout=CHECK_TIMEOUT_S)
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            await client.set(REDIS_PROBE_KEY, "1", px=10_000)
        return "ok"
    except Exception as exc:  # any failure means not ready
        if redis_refusal(exc) is not None:
            return f"refusing writes: {type(exc).__name__}"
        return f"unreachable: {type(exc).__name__}"
    finally:
        await client.aclose()


class StorageCheck:
    """The storage check, run on the probe executor: free space and a write for local storage,
    HEAD bucket (and now and then a write) for S3."""

    def __init__(self, storage: Any, min_free_bytes: int) -> None:
        self.storage, self.min_free_bytes = storage, min_free_bytes
        self._last_write = float("-inf")
        self._running: Future | None = None

    def __call__(self) -> str:
        try:
            if isinstance(self.storage, LocalStorage):
                free = shutil.disk_usage(self.storage.root).free
                if free < self.min_free_bytes:
                    return (
                        f"full: {free // MIB} MiB free, under MEGASR_STORAGE_MIN_FREE_MB "
                        f"({self.min_free_bytes // MIB} MiB)"
                    )
            elif time.monotonic() - self._last_write < S3_WRITE_EVERY_S:
                self.storage.ping()
                return "ok"
            self.storage.put(PROBE_KEY, b"ok", "text/plain")
            self.storage.delete(PROBE_KEY)
            self._last_write = time.monotonic()
            return "ok"
        except StorageFull as exc:
            return f"full: {exc}"
        except Exception as exc:  # any failure means not ready
            return f"unreachable: {type(exc).__name__}"

    async def run(self) -> str:
        """The check's result within ``CHECK_TIMEOUT_S``; a check still running from an earlier
        probe is waited for again rather than started twice."""
        if self._running is None or self._running.done():
            self._running = _EXECUTOR.submit(self)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._running)), CHECK_TIMEOUT_S)
        except TimeoutError:
            return f"unreachable: no answer within {CHECK_TIMEOUT_S:g} s"


class Readiness:
    """The Redis and storage checks of one app, and the served models as workers announced them."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.storage = StorageCheck(services.storage, services.settings.storage_min_free_mb * MIB)
        self.cache_s = CACHE_S
        self._result: tuple[float, dict[str, str], dict[str, Any] | None] | None = None
        self._pending: asyncio.Task | None = None

    async def checks(self) -> tuple[dict[str, str], dict[str, Any] | None]:
        """({"redis": ..., "storage": ...}, the announced models by name or None when unreadable)."""
        if self._result is not None and time.monotonic() - self._result[0] < self.cache_s:
            return self._result[1], self._result[2]
        if self._pending is None or self._pending.done() or self._pending.get_loop() is not asyncio.get_running_loop():
            self._pending = asyncio.get_running_loop().create_task(self._check())
        return await asyncio.shield(self._pending)

    async def _check(self) -> tuple[dict[str, str], dict[str, Any] | None]:
        redis_state, storage_state = await asyncio.gather(
            check_redis(self.services.settings.redis_url), self.storage.run()
        )
        announced = await self._announced() if redis_state == "ok" else None
        checks = {"redis": redis_state, "storage": storage_state}
        self._result = (time.monotonic(), checks, announced)
        return checks, announced

    async def _announced(self) -> dict[str, Any] | None:
        """What the served models' workers announced (informative: readiness does not depend on it)."""
        served = self.services.settings.served_models()
        try:
            found = await asyncio.wait_for(
                asyncio.wrap_future(_EXECUTOR.submit(models_registry.read, self.services.redis, served)),
                CHECK_TIMEOUT_S,
            )
        except Exception:  # Redis went away meanwhile: the checks say so next time
            return None
        return {a.name: a for a in found}
