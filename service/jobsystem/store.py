"""Job records in Redis: create (idempotently, within quota), read per tenant, move through states.

The keys are :mod:`service.jobsystem.keys`': the record, the idempotency keys, cancel requests,
each tenant's quota set and listing indexes, the running set and its leases, the storage keys of
every attempt's outputs. Request rates are ``service.rate_limit``'s.

Every state change is ONE compare-and-set transaction (WATCH, then MULTI/EXEC) over all the keys
it touches, RQ's included (``service.jobsystem.queue`` writes into the same transaction; the moves
that touch both are ``service.jobsystem.lifecycle``'s): create = quota check + record +
idempotency key + enqueue; start = running + lease + running set; requeue = queued + no lease +
RQ re-enqueue; finish = final state + every release. A crash between two transactions leaves a
state ``service.jobsystem.sweeper`` repairs. A running job carries its attempt's ``owner`` token:
a job canceled while it starts, finished by one worker, or taken over after its worker died is
never overwritten by another attempt.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NamedTuple

import redis
from redis.client import Pipeline

from service import faults
from service.contracts import JobRecord, JobStatus, ModelInfo
from service.webhooks import schedule_in

from . import keys
from .keys import EXPIRY_KEY, FINISHED_KEY, RUNNING_KEY

if TYPE_CHECKING:
    from .queue import JobQueue

IDEMPOTENCY_TTL_S = 24 * 3600
LEASE_TTL_S = 15
#: how long past the result TTL a job stays in its tenant's list index (no job waits a week in the queue)
INDEX_SLACK_S = 7 * 24 * 3600
#: index entries one listing may walk, per index and per job asked for: expired entries in the way
#: make a short page with a cursor (each is dropped when met) rather than an unbounded scan
LIST_SCAN_FACTOR = 4


class TransitionRejected(RuntimeError):
    """The job is not in a state the requested change may start from."""


class QuotaExceeded(RuntimeError):
    """The tenant already has its maximum of unfinished jobs."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} unfinished jobs already")
        self.limit = limit


class IdempotencyMismatch(RuntimeError):
    """An Idempotency-Key was reused with a different request."""


class ListPosition(NamedTuple):
    """Where a listing stopped: the last job's creation-time score and id (ties by id)."""

    score: float
    job_id: str


#: extra writes a transition adds to its transaction: (pipeline in MULTI mode, the new record)
Extra = Callable[[Pipeline, JobRecord], None]


def _now() -> datetime:
    return datetime.now(UTC)


class JobStore:
    def __init__(self, client: redis.Redis, result_ttl_s: int = 24 * 3600) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s

    # ---------------------------------------------------------------- keys (service.jobsystem.keys)
    key = staticmethod(keys.job_key)
    cancel_key = staticmethod(keys.cancel_key)
    active_key = staticmethod(keys.active_key)
    index_key = staticmethod(keys.index_key)
    status_index_key = staticmethod(keys.status_index_key)
    lease_key = staticmethod(keys.lease_key)
    idempotency_key = staticmethod(keys.idempotency_key)
    outputs_key = staticmethod(keys.outputs_key)

    # ---------------------------------------------------------------- create / read
    def create(
        self,
        record: JobRecord,
        idempotency_key: str | None = None,
        *,
        request_hash: str = "",
        max_active: int | None = None,
        enqueue: Callable[[Pipeline], None] | None = None,
    ) -> tuple[JobRecord, bool]:
        """Store a new job and enqueue it, in one transaction; (record, created).

        With an idempotency key already used for the same request (``request_hash``), return
        that job (created=False); used for another request, raise :class:`IdempotencyMismatch`.
        With ``max_active``, raise :class:`QuotaExceeded` when the tenant has that many
        unfinished jobs: the check and the insert are one transaction (WATCH on the quota set),
        so concurrent submissions never overshoot. ``enqueue(pipe)`` adds RQ's writes.
        """
        active = self.active_key(record.tenant)
        idem = self.idempotency_key(record.tenant, idempotency_key) if idempotency_key else None
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(active, *([idem] if idem else []))
                    if idem is not None:
                        existing = self._idempotent(pipe, idem)
                        if existing is not None:
                            job, stored_hash = existing
                            if stored_hash != request_hash:
                                raise IdempotencyMismatch(
                                    f"the Idempotency-Key was first used for a different request (job {job.id})"
                                )
                            return job, False
                    if max_active is not None and int(pipe.scard(active)) >= max_active:
                        raise QuotaExceeded(max_active)
                    pipe.multi()
                    pipe.set(self.key(record.id), record.model_dump_json())
                    pipe.sadd(active, record.id)
                    self._index(pipe, self.index_key(record.tenant), record)
                    self._index(pipe, self.status_index_key(record.tenant, record.status), record)
                    if idem is not None:
                        pipe.delete(idem)
                        pipe.hset(idem, mapping={"job": record.id, "request": request_hash})
                        pipe.expire(idem, IDEMPOTENCY_TTL_S)
                    if enqueue is not None:
                        enqueue(pipe)
                    faults.step("create:exec")
                    pipe.execute()
                    return record, True
                except redis.WatchError:
                    continue

    def _index(self, pipe: Pipeline, index: str, record: JobRecord) -> None:
        """Add the job to a list index (scored by creation time). An index forgets what can no longer
        have a record (listings also drop expired entries they meet), and a silent tenant's expires whole."""
        horizon = self.result_ttl_s + INDEX_SLACK_S
        pipe.zadd(index, {record.id: record.created_at.timestamp()})
        pipe.zremrangebyscore(index, "-inf", min(record.created_at.timestamp(), time.time()) - horizon)
        pipe.expire(index, int(horizon))

    def _idempotent(self, client: redis.Redis | Pipeline, idem: str) -> tuple[JobRecord, str] | None:
        """The live job an idempotency key points to, and the request hash stored with it."""
        entry = client.hgetall(idem)
        job_id = entry.get(b"job")
        raw = client.get(self.key(job_id.decode())) if job_id else None
        if raw is None:
            return None  # unused, or its job has expired: the key may be taken again
        return JobRecord.model_validate_json(raw), entry.get(b"request", b"").decode()

    def find_idempotent(self, tenant: str, idempotency_key: str) -> JobRecord | None:
        found = self.find_idempotent_request(tenant, idempotency_key)
        return found[0] if found else None

    def find_idempotent_request(self, tenant: str, idempotency_key: str) -> tuple[JobRecord, str] | None:
        """The job of an idempotency key and the hash of the request that created it."""
        return self._idempotent(self.redis, self.idempotency_key(tenant, idempotency_key))

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.get(self.key(job_id))
        return JobRecord.model_validate_json(raw) if raw else None

    def get_for_tenant(self, job_id: str, tenant: str) -> JobRecord | None:
        """The job if it exists and belongs to ``tenant``; otherwise None (callers answer 404)."""
        record = self.get(job_id)
        return record if record is not None and record.tenant == tenant else None

    def list_for_tenant(
        self,
        tenant: str,
        limit: int,
        after: ListPosition | None = None,
        statuses: Collection[JobStatus] = (),
    ) -> tuple[list[JobRecord], ListPosition | None]:
        """A page of the tenant's jobs, newest first, from just after ``after``; (records, position
        of the last one if more may follow). With ``statuses``, only jobs in one of them.

        Reads the per-status indexes of ``statuses`` (merged), else the tenant's index: at most
        ``LIST_SCAN_FACTOR * (limit + 1)`` entries of each (plus ties at the cursor's score),
        whatever the history. Entries whose record has expired are removed on the way; when they use
        up that budget the page is short and still has a position to go on from.
        """
        keys = [self.status_index_key(tenant, s) for s in dict.fromkeys(statuses)] or [self.index_key(tenant)]
        wanted = set(statuses)
        page: list[JobRecord] = []
        position = after
        budget = LIST_SCAN_FACTOR * (limit + 1)
        skipped = 0  # entries met without a record to list: each round reads as many more
        while budget > 0:
            count = min(limit + 1, limit - len(page) + 1 + skipped, budget)
            entries = self._next_entries(keys, position, count)
            budget -= max(len(entries), 1)
            raws = self.redis.mget([self.key(job_id) for _, job_id, _ in entries]) if entries else []
            expired: dict[str, list[str]] = {}
            for (score, job_id, index), raw in zip(entries, raws):
                record = JobRecord.model_validate_json(raw) if raw is not None else None
                if record is not None and record.tenant == tenant and (not wanted or record.status in wanted):
                    if len(page) == limit:
                        return page, position  # one more follows
                    page.append(record)
                else:
                    skipped += 1
                    if record is None:
                        expired.setdefault(index, []).append(job_id)
                position = ListPosition(score, job_id)
            for index, job_ids in expired.items():
                self.redis.zrem(index, *job_ids)
            if len(entries) < count:
                return page, None  # every index is read to its end
        return page, position

    def _next_entries(self, keys: list[str], after: ListPosition | None, count: int) -> list[tuple[float, str, str]]:
        """The first ``count`` entries (score, job id, index) after ``after`` across the indexes ``keys``,
        newest first, ties by descending id (the order of ZREVRANGE); O(count + ties) per index."""
        with self.redis.pipeline(transaction=False) as pipe:
            if after is None:
                for key in keys:
                    pipe.zrevrange(key, 0, count - 1, withscores=True)
            else:  # the range starts at the cursor's score inclusive: skip the ties up to its id
                for key in keys:
                    pipe.zcount(key, after.score, after.score)
                ties = pipe.execute()
                for key, tied in zip(keys, ties):
                    pipe.zrevrangebyscore(key, after.score, "-inf", start=0, num=count + int(tied), withscores=True)
            ranges = pipe.execute()
        runs = []
        for key, found in zip(keys, ranges):
            run = [(score, member.decode(), key) for member, score in found]
            if after is not None:
                run = [e for e in run if e[0] < after.score or e[1] < after.job_id]
            runs.append(run[:count])
        merged: list[tuple[float, str, str]] = []
        for entry in heapq.merge(*runs, key=lambda e: (e[0], e[1]), reverse=True):
            if merged and merged[-1][1] == entry[1]:
                continue  # in two indexes for a moment (a mixed-version upgrade): listed once
            merged.append(entry)
            if len(merged) == count:
                break
        return merged

    def active_count(self, tenant: str) -> int:
        return int(self.redis.scard(self.active_key(tenant)))

    def active_jobs(self) -> Iterator[tuple[str, str]]:
        """(tenant, job id) of every job in a tenant's quota set: all unfinished jobs."""
        prefix, suffix = keys.ACTIVE_PREFIX, keys.ACTIVE_SUFFIX
        for key in self.redis.scan_iter(match=f"{prefix}*{suffix}", count=500):
            tenant = key.decode()[len(prefix) : -len(suffix)]
            for job_id in self.redis.smembers(key):
                yield tenant, job_id.decode()

    # ---------------------------------------------------------------- transitions
    def transition(
        self,
        job_id: str,
        allowed_from: Iterable[JobStatus],
        to: JobStatus | None = None,
        expect_owner: str | None = None,
        extra: Extra | None = None,
        derive: Callable[[JobRecord], dict[str, object]] | None = None,
        step: str = "transition",
        **changes: object,
    ) -> JobRecord:
        """Atomically change a job that is in one of ``allowed_from`` (optionally to state ``to``).

        With ``expect_owner``, the job must still belong to that attempt. ``derive(record)``
        computes changes from the current record; ``extra`` adds writes to the same transaction.
        A final state also releases everything the job held (lease, quota slot, cancel flag).
        """
        allowed = set(allowed_from)
        key = self.key(job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise TransitionRejected(f"job {job_id} does not exist")
                    record = JobRecord.model_validate_json(raw)
                    if record.status not in allowed:
                        raise TransitionRejected(f"job {job_id} is {record.status.value}")
                    if expect_owner is not None and record.owner != expect_owner:
                        raise TransitionRejected(f"job {job_id} was taken over by another attempt")
                    derived = derive(record) if derive is not None else {}
                    updated = record.model_copy(update={**derived, **changes, **({"status": to} if to else {})})
                    pipe.multi()
                    pipe.set(key, updated.model_dump_json())
                    if updated.status != record.status:  # the status filter's index moves with it
                        pipe.zrem(self.status_index_key(record.tenant, record.status), job_id)
                        self._index(pipe, self.status_index_key(updated.tenant, updated.status), updated)
                    if updated.status.is_final:
                        pipe.hincrby(FINISHED_KEY, updated.status.value, 1)
                        pipe.zadd(EXPIRY_KEY, {job_id: time.time() + self.result_ttl_s})
                        if updated.params.webhook_url is not None:
                            schedule_in(pipe, updated)
                        pipe.srem(self.active_key(updated.tenant), job_id)
                        pipe.expire(key, self.result_ttl_s)
                        pipe.delete(self.cancel_key(job_id), self.lease_key(job_id))
                        pipe.srem(RUNNING_KEY, job_id)
                    if extra is not None:
                        extra(pipe, updated)
                    faults.step(f"{step}:exec")
                    pipe.execute()
                    return updated
                except redis.WatchError:
                    continue

    def start(self, job_id: str, owner: str, extra: Extra | None = None) -> JobRecord:
        """Mark the job running for the attempt ``owner``, take its lease and join the running set.

        Only from queued: a job another attempt is running is never started twice (a dead
        attempt's job is moved back to queued by the reaper first). ``extra``: e.g. a batch
        claim's removal of the job from RQ's queue, in the same transaction.
        """

        def hold(pipe: Pipeline, record: JobRecord) -> None:
            pipe.set(self.lease_key(job_id), owner, ex=LEASE_TTL_S)
            pipe.sadd(RUNNING_KEY, job_id)
            if extra is not None:
                extra(pipe, record)

        return self.transition(
            job_id,
            [JobStatus.queued],
            JobStatus.running,
            extra=hold,
            step="start",
            derive=lambda r: {"attempts": r.attempts + 1},
            started_at=_now(),
            progress=0.0,
            owner=owner,
        )

    def requeue(self, job_id: str, owner: str | None, queue: JobQueue | None) -> JobRecord:
        """Move a running attempt's job back to queued and drop its lease, in one transaction.

        With ``queue``, the job is also put back at the front of RQ's queue in that transaction
        (the reaper, the sweeper, a batch mate's retry). Without, RQ's own retry of the job it
        handed the worker re-queues it after the task returns (a crash in between is repaired
        by the sweeper). ``owner=None``: whichever attempt holds it (none is alive).
        """
        stale = queue.fetch(job_id) if queue is not None else None

        def release(pipe: Pipeline, record: JobRecord) -> None:
            pipe.delete(self.lease_key(job_id))
            pipe.srem(RUNNING_KEY, job_id)
            if queue is not None:
                queue.requeue(job_id, record.tenant, pipe, stale)

        return self.transition(
            job_id,
            [JobStatus.running],
            JobStatus.queued,
            expect_owner=owner,
            extra=release,
            step="requeue",
            owner=None,
            progress=0.0,
        )

    def renew_lease(self, job_id: str, owner: str) -> None:
        self.redis.set(self.lease_key(job_id), owner, ex=LEASE_TTL_S)

    def set_progress(self, job_id: str, progress: float, owner: str | None = None) -> None:
        try:
            self.transition(
                job_id, [JobStatus.running], expect_owner=owner, progress=round(min(max(progress, 0.0), 1.0), 4)
            )
        except TransitionRejected:
            pass

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        owner: str | None = None,
        extra: Extra | None = None,
        model_info: ModelInfo | None = None,
        **changes: object,
    ) -> JobRecord:
        """Move the job to a final state and release everything it held, in one transaction.

        ``model_info``: the model that ran it (the worker's), kept in the record."""
        if not status.is_final:
            raise ValueError(f"{status.value} is not a final state")
        if model_info is not None:
            changes["model_info"] = model_info
        allowed = [JobStatus.running] if owner is not None else [JobStatus.queued, JobStatus.running]
        return self.transition(
            job_id, allowed, status, expect_owner=owner, extra=extra, step="finish", finished_at=_now(), **changes
        )

    def still_owner(self, job_id: str, owner: str) -> bool:
        record = self.get(job_id)
        return record is not None and record.status == JobStatus.running and record.owner == owner

    def abandoned(self) -> list[str]:
        """Running jobs whose worker stopped renewing the lease (killed, lost its node…)."""
        ids = [i.decode() for i in self.redis.smembers(RUNNING_KEY)]
        if not ids:
            return []
        with self.redis.pipeline() as pipe:
            for job_id in ids:
                pipe.exists(self.lease_key(job_id))
            alive = pipe.execute()
        return [job_id for job_id, live in zip(ids, alive) if not live]

    # ---------------------------------------------------------------- results
    def note_output(self, job_id: str, storage_key: str) -> None:
        """Remember a result's storage key before it is written, so that its deletion finds it
        even when the attempt dies or is fenced out before recording it."""
        with self.redis.pipeline() as pipe:
            pipe.sadd(self.outputs_key(job_id), storage_key)
            pipe.expire(self.outputs_key(job_id), self.result_ttl_s + IDEMPOTENCY_TTL_S)
            pipe.execute()

    def outputs(self, job_id: str) -> list[str]:
        return sorted(k.decode() for k in self.redis.smembers(self.outputs_key(job_id)))

    def due_for_deletion(self, limit: int = 100) -> list[str]:
        """Finished jobs whose images have outlived the result TTL."""
        return [i.decode() for i in self.redis.zrangebyscore(EXPIRY_KEY, "-inf", time.time(), start=0, num=limit)]

    def forget(self, job_id: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.zrem(EXPIRY_KEY, job_id)
            pipe.delete(self.outputs_key(job_id))
            pipe.execute()

    # ---------------------------------------------------------------- cancel
    def request_cancel(self, job_id: str) -> None:
        self.redis.set(self.cancel_key(job_id), b"1", ex=24 * 3600)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.cancel_key(job_id)))
