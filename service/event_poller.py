"""One poller per API process that reads every followed job for all event streams at once.

Each ``GET /v1/jobs/{id}/events`` stream used to read its job through the shared thread pool
every half second: 800 streams made 1,600 thread hand-offs and Redis round trips a second, and
``/healthz`` waited behind them. Async Redis per stream would free the threads but still cost a
round trip per stream per tick. Here one asyncio task per process reads ALL followed jobs in ONE
pipelined round trip per tick (the record, the cancel flag and, for waiting jobs, the queue
position: what ``routes.jobs`` puts in a job's view), parses only records that changed, and
wakes just the streams whose job changed. Streams hold no thread; the poller runs its blocking
read on its own single thread, never on the pool the sync routes share, and uses the app's Redis
client (its timeouts and failure handling). Redis is still the only source: any number of API
replicas work without pub/sub.

A new follower makes the poller tick at once (at most every :data:`MIN_GAP_S`), so a stream's
first event does not wait for the next tick. While Redis fails, streams keep their last view and
send keep-alives; after :data:`STALE_AFTER_S` without a good read they end quietly (clients
reconnect, get a 503 and poll).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import redis
from pydantic import ValidationError

from .contracts import JobRecord, JobStatus
from .jobsystem.keys import cancel_key, job_key

log = logging.getLogger(__name__)

#: a new follower triggers a tick, but ticks never come closer together than this
MIN_GAP_S = 0.05
#: without a good read for this long, streams end (their data would be stale)
STALE_AFTER_S = 5.0


class FeedUnavailable(RuntimeError):
    """The poller has had no good read from Redis for :data:`STALE_AFTER_S`."""


@dataclass(frozen=True)
class Snapshot:
    """A job as the last tick read it; ``record`` None once the record is gone (expired)."""

    record: JobRecord | None
    position: int | None
    cancel_requested: bool


class _Target(NamedTuple):
    """What one tick reads for one job (built on the event loop, read in the poller's thread)."""

    job_id: str
    queue_key: str
    raw: bytes | None  # the record as last read: unchanged bytes are not parsed again
    record: JobRecord | None
    want_position: bool


class _Watch:
    """A followed job: its latest snapshot, shared by every stream that follows it."""

    def __init__(self, job_id: str, queue_key: str) -> None:
        self.job_id, self.queue_key = job_id, queue_key
        self.followers = 0
        self.snapshot: Snapshot | None = None
        self.raw: bytes | None = None
        self.version = 0
        self.changed = asyncio.Event()

    def target(self) -> _Target:
        record = self.snapshot.record if self.snapshot is not None else None
        want_position = record is None or record.status == JobStatus.queued
        return _Target(self.job_id, self.queue_key, self.raw, record, want_position)

    def update(self, raw: bytes | None, snapshot: Snapshot) -> None:
        self.raw = raw
        if snapshot != self.snapshot:
            self.snapshot, self.version = snapshot, self.version + 1
            changed, self.changed = self.changed, asyncio.Event()
            changed.set()  # wakes the streams waiting on this job only


class Follow:
    """One stream's subscription to a job; :meth:`close` exactly when the stream ends."""

    def __init__(self, poller: JobPoller, watch: _Watch) -> None:
        self._poller, self._watch = poller, watch
        self._seen = watch.version
        self._closed = False

    async def latest(self) -> Snapshot:
        """The job's latest snapshot (the first read waits for a tick); FeedUnavailable when stale."""
        while True:
            if self._poller.stale():
                raise FeedUnavailable("no good read of Redis for a while")
            snapshot = self._watch.snapshot
            if snapshot is not None:
                self._seen = self._watch.version
                return snapshot
            await self.wait_change(self._poller.interval_s)

    async def wait_change(self, timeout: float) -> None:
        """Until the job changes after the last :meth:`latest`, or ``timeout`` seconds."""
        if self._watch.version != self._seen:
            return
        try:
            async with asyncio.timeout(timeout):
                await self._watch.changed.wait()
        except TimeoutError:
            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._poller._unfollow(self._watch)


class JobPoller:
    """Reads every followed job once per ``interval_s`` (see the module docstring)."""

    def __init__(self, client: redis.Redis, interval_s: float) -> None:
        self.redis, self.interval_s = client, interval_s
        self._watches: dict[str, _Watch] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megasr-events")
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._last_ok = time.monotonic()
        self._failing = False
        self.ticks = 0

    @property
    def followed(self) -> int:
        """Jobs followed now (each read once per tick however many streams follow it)."""
        return len(self._watches)

    def follow(self, job_id: str, queue_key: str) -> Follow:
        """Start following a job (call on the event loop); the poller starts with its first follower."""
        watch = self._watches.get(job_id)
        if watch is None:
            watch = self._watches[job_id] = _Watch(job_id, queue_key)
            self._wake.set()
        watch.followers += 1
        if self._task is None or self._task.done():
            self._last_ok = time.monotonic()
            self._wake = asyncio.Event()  # bound to this loop (a test may run several in turn)
            self._wake.set()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="megasr-event-poller")
        return Follow(self, watch)

    def stale(self) -> bool:
        return time.monotonic() - self._last_ok > STALE_AFTER_S

    def _unfollow(self, watch: _Watch) -> None:
        watch.followers -= 1
        if watch.followers <= 0 and self._watches.get(watch.job_id) is watch:
            del self._watches[watch.job_id]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._watches:  # ends with the last follower; follow() starts it again
            watches = list(self._watches.values())
            self._wake.clear()
            try:
                read = await loop.run_in_executor(self._executor, self._read, [w.target() for w in watches])
            except (redis.RedisError, OSError) as exc:
                if not self._failing:
                    log.warning("event streams: reading followed jobs from Redis failed (%s); retrying", exc)
                self._failing = True
            else:
                if self._failing:
                    log.info("event streams: Redis reads work again")
                self._failing, self._last_ok = False, time.monotonic()
                for watch, (raw, snapshot) in zip(watches, read):
                    watch.update(raw, snapshot)
            self.ticks += 1
            await asyncio.sleep(MIN_GAP_S)
            try:
                async with asyncio.timeout(max(0.0, self.interval_s - MIN_GAP_S)):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _read(self, targets: list[_Target]) -> list[tuple[bytes | None, Snapshot]]:
        """One pipelined round trip for all targets (a second only for jobs that went back to the
        queue since the last tick, whose position was not asked for); runs in the poller's thread."""
        with self.redis.pipeline(transaction=False) as pipe:
            for target in targets:
                pipe.get(job_key(target.job_id))
                pipe.exists(cancel_key(target.job_id))
                if target.want_position:
                    pipe.lpos(target.queue_key, target.job_id)
            replies = iter(pipe.execute())
        found = []
        for target in targets:
            raw, cancel = next(replies), bool(next(replies))
            position = next(replies) if target.want_position else None
            record = target.record if raw == target.raw else _parse(target.job_id, raw)
            found.append((raw, record, cancel, position))
        late = [
            i
            for i, (_, record, _, _) in enumerate(found)
            if record is not None and record.status == JobStatus.queued and not targets[i].want_position
        ]
        if late:
            with self.redis.pipeline(transaction=False) as pipe:
                for i in late:
                    pipe.lpos(targets[i].queue_key, targets[i].job_id)
                for i, position in zip(late, pipe.execute()):
                    raw, record, cancel, _ = found[i]
                    found[i] = (raw, record, cancel, position)
        return [
            (raw, Snapshot(record, None if position is None else int(position), cancel))
            for raw, record, cancel, position in found
        ]


def _parse(job_id: str, raw: bytes | None) -> JobRecord | None:
    if raw is None:
        return None
    try:
        return JobRecord.model_validate_json(raw)
    except ValidationError:
        log.warning("event streams: job %s has an unreadable record; its streams end", job_id)
        return None
