"""Housekeeping any process may run: re-queue dead workers' jobs, delete expired results.

Re-queue the jobs of workers that died mid-job (SIGKILL, lost node, OOM-killer):

A running job's worker renews its lease every few seconds (``JobStore.LEASE_TTL_S`` = 15 s).
Any process running :func:`reap_abandoned` every few seconds — every worker does, and so does
``megasr serve`` — puts a job whose lease has expired back at the front of the queue, or fails
it after :data:`MAX_ATTEMPTS`. With the defaults a killed worker's job is queued again within
about 20 seconds. The attempt's owner token fences a late, still-alive worker out.
"""

from __future__ import annotations

import logging

from .contracts import JobError, JobStatus, input_key, output_key
from .deps import Services
from .jobs import TransitionRejected

log = logging.getLogger("megasr.reaper")
MAX_ATTEMPTS = 3
LOCK_KEY = "megasr:reaper:lock"


def reap_abandoned(services: Services) -> list[str]:
    """Requeue (or fail) every job whose lease expired; returns the ids handled."""
    if not services.redis.set(LOCK_KEY, b"1", nx=True, ex=5):
        return []  # another process is reaping right now
    handled = []
    for job_id in services.jobs.abandoned():
        record = services.jobs.get(job_id)
        if record is None or record.status != JobStatus.running:
            services.jobs.release(job_id, "")
            continue
        try:
            if record.attempts >= MAX_ATTEMPTS:
                services.jobs.finish(job_id, JobStatus.failed, owner=record.owner, error=JobError(
                    code="worker_lost", message=f"the worker running this job stopped {record.attempts} times"))
                log.warning("job %s: failed after %d lost workers", job_id, record.attempts)
            else:
                services.jobs.transition(job_id, [JobStatus.running], JobStatus.queued, expect_owner=record.owner,
                                         owner=None, progress=0.0)
                services.jobs.release(job_id, record.owner or "")
                services.queue.requeue(job_id)
                log.warning("job %s: its worker stopped renewing the lease; queued again", job_id)
            handled.append(job_id)
        except TransitionRejected:
            continue  # it finished or moved on meanwhile
    return handled


def delete_expired_results(services: Services) -> int:
    """Delete the images of jobs finished longer than the result TTL ago (Redis expires the record)."""
    deleted = 0
    for job_id in services.jobs.due_for_deletion():
        for key in (input_key(job_id), *(output_key(job_id, fmt) for fmt in ("png", "jpeg", "webp"))):
            services.storage.delete(key)
        services.jobs.forget(job_id)
        deleted += 1
    return deleted
