"""The moves of a job that change its record and its place in RQ's queue together, each one call.

The record (``service.jobsystem.store``) and RQ's lists (``service.jobsystem.queue``) live in
the same Redis, and each move below writes both in ONE transaction: a crash or a concurrent
worker sees the job before or after the move, never half of it. Callers (the API's routes, the
worker's batching and retries, the reaper and the sweeper) name the move, not its parts.
"""

from __future__ import annotations

from service.contracts import JobRecord, JobStatus

from .queue import JobQueue
from .store import JobStore


def submit(
    jobs: JobStore,
    queue: JobQueue,
    record: JobRecord,
    idempotency_key: str | None,
    *,
    request_hash: str,
    max_active: int | None,
) -> tuple[JobRecord, bool]:
    """Record the job and enqueue it (quota, idempotency key, RQ's enqueue: one transaction);
    (record, created). Raises ``QuotaExceeded`` and ``IdempotencyMismatch`` as ``JobStore.create``."""
    return jobs.create(
        record,
        idempotency_key,
        request_hash=request_hash,
        max_active=max_active,
        enqueue=lambda pipe: queue.enqueue(record.id, record.tenant, pipeline=pipe),
    )


def cancel_queued(jobs: JobStore, queue: JobQueue, job_id: str) -> JobRecord:
    """Cancel a waiting job: its record goes to canceled as it leaves RQ's queue. Raises
    ``TransitionRejected`` when a worker took it meanwhile (cancel it running instead)."""
    return jobs.finish(job_id, JobStatus.canceled, extra=lambda pipe, _: queue.cancel_queued(job_id, pipe))


def claim(jobs: JobStore, queue: JobQueue, job_id: str, owner: str) -> JobRecord:
    """Start a waiting job for the attempt ``owner`` (a batch mate) and take it out of RQ's queue.
    Raises ``TransitionRejected`` when it was canceled or another worker started it first."""
    return jobs.start(job_id, owner, extra=lambda pipe, _: queue.discard(job_id, pipe, None))


def requeue(jobs: JobStore, queue: JobQueue, job_id: str, owner: str | None) -> JobRecord:
    """Put a running job back at the front of RQ's queue, its lease dropped (its attempt died or
    failed transiently); ``owner=None``: whichever attempt holds it. Raises ``TransitionRejected``."""
    return jobs.requeue(job_id, owner, queue)
