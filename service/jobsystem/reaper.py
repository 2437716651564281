"""Housekeeping any process may run: re-queue dead workers' jobs, delete expired results.

Re-queue the jobs of workers that died mid-job (SIGKILL, lost node, OOM-killer):

A running job's worker renews its lease every few seconds (``JobStore.LEASE_TTL_S`` = 15 s).
Any process running :func:`reap_abandoned` every few seconds — every worker does, and so does
``megasr serve`` — puts a job whose lease has expired back at the front of the queue, or fails
it after ``sweeper.MAX_ATTEMPTS``. With the defaults a killed worker's job is queued again within
about 20 seconds. The attempt's owner token fences a late, still-alive worker out. Every
``SWEEP_INTERVAL_S`` a pass also runs the sweeper (``service.jobsystem.sweeper``), which repairs what a
crash between two steps left behind.
"""

from __future__ import annotations

import logging

from service.contracts import JobStatus, input_key, output_key

from .keys import REAPER_LOCK_KEY, RUNNING_KEY, SWEEP_LOCK_KEY
from .services import Services
from .sweeper import SWEEP_INTERVAL_S, SweepReport, recover_running, sweep

__all__ = ["reap_abandoned", "delete_expired_results"]

log = logging.getLogger("megasr.reaper")


def reap_abandoned(services: Services) -> list[str]:
    """Requeue (or fail) every job whose lease expired, then sweep (``service.jobsystem.sweeper``);
    returns the ids handled."""
    if not services.redis.set(REAPER_LOCK_KEY, b"1", nx=True, ex=5):
        return []  # another process is reaping right now
    report = SweepReport()
    for job_id in services.jobs.abandoned():
        record = services.jobs.get(job_id)
        if record is None or record.status != JobStatus.running:
            services.redis.srem(RUNNING_KEY, job_id)
            continue
        recover_running(services, record, report)
    handled = report.ids()
    if services.redis.set(SWEEP_LOCK_KEY, b"1", nx=True, ex=SWEEP_INTERVAL_S):
        handled += sweep(services).ids()
    return list(dict.fromkeys(handled))


def delete_expired_results(services: Services) -> int:
    """Delete the images of jobs finished longer than the result TTL ago (Redis expires the record):
    the input, every attempt's output (``JobStore.note_output``) and the pre-fencing output names."""
    deleted = 0
    for job_id in services.jobs.due_for_deletion():
        legacy = [output_key(job_id, fmt) for fmt in ("png", "jpeg", "webp")]
        for key in (input_key(job_id), *services.jobs.outputs(job_id), *legacy):
            services.storage.delete(key)
        services.jobs.forget(job_id)
        deleted += 1
    return deleted
