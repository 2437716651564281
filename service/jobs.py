"""Job records in Redis: create (idempotently), read per tenant, move through states safely.

Keys (all under ``megasr:``): ``job:<id>`` the record (JSON), ``idem:<tenant>:<key>`` the
job an idempotency key created, ``cancel:<id>`` a running job's cancel request,
``tenant:<tenant>:active`` the tenant's unfinished jobs (queue quota), ``rate:<tenant>:<minute>``
the tenant's requests this minute, ``running`` the jobs being run and ``lease:<id>`` each one's
liveness lease (renewed by its worker every few seconds). State changes are compare-and-set
transactions, and a running job carries its attempt's ``owner`` token: a job canceled while it
starts, finished by one worker, or taken over after its worker died is never overwritten by
another attempt.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime, timezone

import redis

from .contracts import JOB_KEY_PREFIX, JobRecord, JobStatus
from .webhooks import schedule_in

IDEMPOTENCY_TTL_S = 24 * 3600
LEASE_TTL_S = 15
RUNNING_KEY = "megasr:running"
EXPIRY_KEY = "megasr:expiry"  # finished job ids scored by when their images are deleted
FINISHED_KEY = "megasr:stats:finished"  # finished jobs per final status (metrics)


class TransitionRejected(RuntimeError):
    """The job is not in a state the requested change may start from."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


class JobStore:
    def __init__(self, client: redis.Redis, result_ttl_s: int = 24 * 3600) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s

    # ---------------------------------------------------------------- keys
    @staticmethod
    def key(job_id: str) -> str:
        return JOB_KEY_PREFIX + job_id

    @staticmethod
    def cancel_key(job_id: str) -> str:
        return f"megasr:cancel:{job_id}"

    @staticmethod
    def active_key(tenant: str) -> str:
        return f"megasr:tenant:{tenant}:active"

    # ---------------------------------------------------------------- create / read
    def create(self, record: JobRecord, idempotency_key: str | None = None) -> tuple[JobRecord, bool]:
        """Store a new job; with an idempotency key already used, return that job (created=False)."""
        if idempotency_key:
            idem = f"megasr:idem:{record.tenant}:{idempotency_key}"
            if not self.redis.set(idem, record.id, nx=True, ex=IDEMPOTENCY_TTL_S):
                existing_id = self.redis.get(idem)
                existing = self.get(existing_id.decode()) if existing_id else None
                if existing is not None:
                    return existing, False
                self.redis.set(idem, record.id, ex=IDEMPOTENCY_TTL_S)  # the old job expired
        with self.redis.pipeline() as pipe:
            pipe.set(self.key(record.id), record.model_dump_json())
            pipe.sadd(self.active_key(record.tenant), record.id)
            pipe.execute()
        return record, True

    def find_idempotent(self, tenant: str, idempotency_key: str) -> JobRecord | None:
        job_id = self.redis.get(f"megasr:idem:{tenant}:{idempotency_key}")
        return self.get(job_id.decode()) if job_id else None

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.get(self.key(job_id))
        return JobRecord.model_validate_json(raw) if raw else None

    def get_for_tenant(self, job_id: str, tenant: str) -> JobRecord | None:
        """The job if it exists and belongs to ``tenant``; otherwise None (callers answer 404)."""
        record = self.get(job_id)
        return record if record is not None and record.tenant == tenant else None

    def active_count(self, tenant: str) -> int:
        return int(self.redis.scard(self.active_key(tenant)))

    def count_request(self, tenant: str) -> int:
        """Requests of ``tenant`` in the current minute, this one included."""
        key = f"megasr:rate:{tenant}:{int(time.time() // 60)}"
        with self.redis.pipeline() as pipe:
            pipe.incr(key)
            pipe.expire(key, 120)
            count, _ = pipe.execute()
        return int(count)

    # ---------------------------------------------------------------- transitions
    @staticmethod
    def lease_key(job_id: str) -> str:
        return f"megasr:lease:{job_id}"

    def transition(
        self, job_id: str, allowed_from: Iterable[JobStatus], to: JobStatus | None = None,
        expect_owner: str | None = None, **changes: object,
    ) -> JobRecord:
        """Atomically change a job that is in one of ``allowed_from`` (optionally to state ``to``).

        With ``expect_owner``, the job must still belong to that attempt.
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
                    updated = record.model_copy(update={**changes, **({"status": to} if to else {})})
                    pipe.multi()
                    pipe.set(key, updated.model_dump_json())
                    if updated.status.is_final:
                        pipe.hincrby(FINISHED_KEY, updated.status.value, 1)
                        pipe.zadd(EXPIRY_KEY, {job_id: time.time() + self.result_ttl_s})
                        if updated.params.webhook_url is not None:
                            schedule_in(pipe, updated)
                        pipe.srem(self.active_key(updated.tenant), job_id)
                        pipe.expire(key, self.result_ttl_s)
                        pipe.delete(self.cancel_key(job_id), self.lease_key(job_id))
                        pipe.srem(RUNNING_KEY, job_id)
                    pipe.execute()
                    return updated
                except redis.WatchError:
                    continue

    def start(self, job_id: str, owner: str) -> JobRecord:
        """Mark the job running for the attempt ``owner`` and take its lease."""
        record = self.get(job_id)
        attempts = (record.attempts if record else 0) + 1
        # Only from queued: a job another attempt is running is never started twice (a dead
        # attempt's job is moved back to queued by the reaper first).
        updated = self.transition(job_id, [JobStatus.queued], JobStatus.running,
                                  started_at=_now(), attempts=attempts, progress=0.0, owner=owner)
        with self.redis.pipeline() as pipe:
            pipe.set(self.lease_key(job_id), owner, ex=LEASE_TTL_S)
            pipe.sadd(RUNNING_KEY, job_id)
            pipe.execute()
        return updated

    def renew_lease(self, job_id: str, owner: str) -> None:
        self.redis.set(self.lease_key(job_id), owner, ex=LEASE_TTL_S)

    def set_progress(self, job_id: str, progress: float, owner: str | None = None) -> None:
        try:
            self.transition(job_id, [JobStatus.running], expect_owner=owner, progress=round(min(max(progress, 0.0), 1.0), 4))
        except TransitionRejected:
            pass

    def finish(self, job_id: str, status: JobStatus, owner: str | None = None, **changes: object) -> JobRecord:
        if not status.is_final:
            raise ValueError(f"{status} is not a final state")
        allowed = [JobStatus.running] if owner is not None else [JobStatus.queued, JobStatus.running]
        return self.transition(job_id, allowed, status, expect_owner=owner, finished_at=_now(), **changes)

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

    def due_for_deletion(self, limit: int = 100) -> list[str]:
        """Finished jobs whose images have outlived the result TTL."""
        return [i.decode() for i in self.redis.zrangebyscore(EXPIRY_KEY, "-inf", time.time(), start=0, num=limit)]

    def forget(self, job_id: str) -> None:
        self.redis.zrem(EXPIRY_KEY, job_id)

    def release(self, job_id: str, owner: str) -> None:
        """Drop a lease without finishing (the job goes back to the queue for a retry)."""
        with self.redis.pipeline() as pipe:
            pipe.delete(self.lease_key(job_id))
            pipe.srem(RUNNING_KEY, job_id)
            pipe.execute()

    # ---------------------------------------------------------------- cancel
    def request_cancel(self, job_id: str) -> None:
        self.redis.set(self.cancel_key(job_id), b"1", ex=24 * 3600)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.cancel_key(job_id)))
