"""Workers running inside this process (``megasr serve`` without Redis), as the API sees them.

The embedded worker thread (``worker.embedded``) registers a :class:`LocalWorker` for its Redis
and queue and records its state on it (loading, ready, stopped, failed). The API app serving the
same Redis and queue reads it: ``/readyz`` answers 503 while no live in-process worker can take
jobs, and ``/metrics`` includes the worker's own metrics. An API whose workers are other
processes has none registered and checks only Redis and storage.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass
from typing import Any


class WorkerState(str, enum.Enum):
    loading = "loading"  # weights loading, warming up
    ready = "ready"  # taking jobs
    stopped = "stopped"  # its job loop ended
    failed = "failed"  # the weights failed to load, or the loop died of an error


@dataclass
class LocalWorker:
    redis_url: str
    queue: str
    state: WorkerState = WorkerState.loading
    detail: str | None = None
    #: the thread running the job loop; a dead thread is never ready, whatever the state says
    thread: threading.Thread | None = None
    #: the worker's prometheus_client registry, once it has one
    registry: Any = None

    @property
    def live(self) -> bool:
        return self.state == WorkerState.ready and (self.thread is None or self.thread.is_alive())

    def describe(self) -> str:
        if self.state == WorkerState.ready and not self.live:
            return "stopped: the worker thread died"
        return self.state.value + (f": {self.detail}" if self.detail else "")


_lock = threading.Lock()
_workers: list[LocalWorker] = []


def register(worker: LocalWorker) -> LocalWorker:
    with _lock:
        _workers.append(worker)
    return worker


def unregister(worker: LocalWorker) -> None:
    with _lock:
        if worker in _workers:
            _workers.remove(worker)


def serving(redis_url: str | None, queue: str) -> list[LocalWorker]:
    """The in-process workers taking jobs from this Redis and queue."""
    with _lock:
        return [w for w in _workers if w.redis_url == redis_url and w.queue == queue]
