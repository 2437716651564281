"""Inputs of the jobs waiting next, fetched and decoded while the GPU runs the current batch.

Before a batch goes to the GPU, the worker asks :class:`InputPrefetcher` to read the first jobs
waiting in its queue (as many as a batch holds), fetch their inputs from storage and decode them
under the worker's decode budgets, in a background thread, into a small cache. When RQ hands one
of them to this worker (or it joins a batch), its input comes from the cache instead of storage.

Nothing is claimed and no record changes: a job another worker takes, or one canceled meanwhile,
only wastes its prefetch, and a crash loses nothing but the cache. A prefetch that fails for any
reason is dropped quietly; the job's own load then meets the error and handles it as always.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from queue import Full, Queue
from typing import Any

from service.jobsystem.services import Services

from .input_image import load_input

log = logging.getLogger("megasr.worker")


class InputPrefetcher:
    """A bounded cache of decoded inputs of jobs still waiting, filled by one background thread."""

    def __init__(self, services: Services, queue: Any, capacity: int = 16) -> None:
        self.services, self.queue, self.capacity = services, queue, max(1, capacity)
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()  # (job id, input key) → image
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        # One daemon thread: a stopping worker never waits for a prefetch (a storage read during an
        # outage can take minutes); requests beyond a few are dropped, not queued up.
        self._requests: Queue[tuple[int, set[str]] | threading.Event | None] = Queue(maxsize=4)
        self._thread = threading.Thread(target=self._serve, name="megasr-prefetch", daemon=True)
        self._thread.start()
        #: inputs served from the cache, and prefetches that failed or were wasted (for tests, metrics)
        self.hits = 0
        self.misses = 0

    def prefetch_next(self, count: int, skip: set[str] | frozenset[str] = frozenset()) -> None:
        """Start fetching the inputs of the first ``count`` waiting jobs not in ``skip`` (returns at once)."""
        try:
            self._requests.put_nowait((count, set(skip)))
        except Full:
            pass  # the thread is behind: these jobs load as usual

    def take(self, job_id: str, input_key: str) -> Any | None:
        """The decoded input of ``job_id`` if it was prefetched (removed from the cache), else None."""
        with self._lock:
            image = self._cache.pop((job_id, input_key), None)
        if image is not None:
            self.hits += 1
        return image

    def wait(self, timeout: float = 60.0) -> None:
        """Until the prefetches asked for so far are done (tests)."""
        done = threading.Event()
        self._requests.put(done, timeout=timeout)
        done.wait(timeout)

    def close(self) -> None:
        """Stop the thread after the prefetch it is on (a stopping worker does not wait for it)."""
        try:
            self._requests.put_nowait(None)
        except Full:
            pass  # a daemon thread: it ends with the process

    def _serve(self) -> None:
        while True:
            request = self._requests.get()
            if request is None:
                return
            if isinstance(request, threading.Event):
                request.set()
                continue
            self._prefetch(*request)

    def _prefetch(self, count: int, skip: set[str]) -> None:
        try:
            ids = [job_id for job_id in self.queue.waiting_ids(count + len(skip)) if job_id not in skip][:count]
        except Exception as exc:  # Redis away: the jobs load as usual
            log.debug("prefetch: cannot read the queue: %s", exc)
            return
        for job_id in ids:
            with self._lock:
                if job_id in self._pending or any(key[0] == job_id for key in self._cache):
                    continue
                self._pending.add(job_id)
            try:
                record = self.services.jobs.get(job_id)
                if record is None or record.status.is_final:
                    continue
                image = load_input(self.services.storage.get(record.input_key), self.services.settings)
                with self._lock:
                    self._cache[(job_id, record.input_key)] = image
                    while len(self._cache) > self.capacity:
                        self._cache.popitem(last=False)
                        self.misses += 1
            except Exception as exc:  # the job's own load meets it again, and handles it
                self.misses += 1
                log.debug("prefetch of job %s dropped: %s", job_id, exc)
            finally:
                with self._lock:
                    self._pending.discard(job_id)
