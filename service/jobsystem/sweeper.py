"""Repair what a crash between two of a job's transactions can leave behind.

Each state change of a job is atomic (``service.jobsystem.store``), but a path of several changes (admit →
start → write the result → finish; a retry's requeue → RQ's re-push) can stop between two of
them: the process is SIGKILLed, its node is lost, Redis drops the connection. :func:`sweep`
walks every unfinished job (the tenants' quota sets) and repairs, each repair one
compare-and-set transaction that re-checks the condition it fixes:

* ``running`` with no lease (no live attempt): back to the front of the queue, or failed
  (``worker_lost``) after :data:`MAX_ATTEMPTS`; the reaper does the same for the jobs of the
  running set, this catches the rest;
* ``queued`` but nowhere in RQ (not waiting, not popped by a worker, not being started):
  enqueued again, on its model's queue (``Settings.queue_for``);
* ``queued`` and popped by a worker that never started it, for :data:`POPPED_GRACE_S` (the
  worker died between RQ's pop and the job's start; a live one starts within milliseconds):
  taken out of RQ's list of popped jobs and enqueued again;
* a quota slot held by a finished or vanished job: released.

It runs where the reaper runs (every worker, ``megasr serve``), at most every
:data:`SWEEP_INTERVAL_S` across all processes; a pass costs O(unfinished jobs) Redis reads.

One benign race remains: a job whose worker failed transiently goes back to ``queued`` (our
transaction) a moment before RQ's Retry re-pushes it; if its RQ heartbeat had already expired
(jobs running over ~90 s on an in-process worker), a sweep in that moment enqueues it too. The
duplicate entry only makes a worker find the job already started (or final) and skip it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import redis

from service import faults
from service.contracts import JobError, JobRecord, JobStatus

from . import lifecycle
from .keys import POPPED_SEEN_KEY, RUNNING_KEY
from .services import Services
from .store import TransitionRejected

log = logging.getLogger("megasr.sweeper")
#: attempts (each lost to a dead worker or a transient error) before a job fails
MAX_ATTEMPTS = 3
#: the shortest time between two sweeps (of any process)
SWEEP_INTERVAL_S = 30
#: a job RQ popped but no worker started for this long is a dead worker's (two sweeps at least)
POPPED_GRACE_S = 2 * SWEEP_INTERVAL_S


@dataclass
class SweepReport:
    requeued: list[str] = field(default_factory=list)  # running with no live attempt → queued
    failed: list[str] = field(default_factory=list)  # … after MAX_ATTEMPTS
    enqueued: list[str] = field(default_factory=list)  # queued but lost by RQ → in RQ's queue again
    released: list[str] = field(default_factory=list)  # quota slots of finished or missing jobs

    def ids(self) -> list[str]:
        return [*self.requeued, *self.failed, *self.enqueued, *self.released]


def recover_running(services: Services, record: JobRecord, report: SweepReport) -> None:
    """Requeue (or fail, after MAX_ATTEMPTS) a running job whose attempt is gone."""
    try:
        if record.attempts >= MAX_ATTEMPTS:
            services.jobs.finish(
                record.id,
                JobStatus.failed,
                owner=record.owner,
                error=JobError(
                    code="worker_lost", message=f"the worker running this job stopped {record.attempts} times"
                ),
            )
            report.failed.append(record.id)
            log.warning("job %s: failed after %d lost attempts", record.id, record.attempts)
        else:
            lifecycle.requeue(services.jobs, services.queue_for(record.model), record.id, record.owner)
            report.requeued.append(record.id)
            log.warning("job %s: no live attempt holds it; queued again", record.id)
    except TransitionRejected:
        pass  # it finished or moved on meanwhile


def enqueue_if_lost(services: Services, job_id: str, model: str) -> bool:
    """Enqueue a queued job that RQ does not hold on its model's queue (a job's model never
    changes); one transaction, re-checked under WATCH."""
    jobs, queue = services.jobs, services.queue_for(model)
    with services.redis.pipeline() as pipe:
        while True:
            try:
                pipe.watch(jobs.key(job_id), queue.queue.key, queue.intermediate_key, queue.started_key)
                raw = pipe.get(jobs.key(job_id))
                record = JobRecord.model_validate_json(raw) if raw else None
                if record is None or record.status != JobStatus.queued or queue.claimed_by_rq(job_id, pipe):
                    return False
                stale = queue.fetch(job_id)
                pipe.multi()
                queue.requeue(job_id, record.tenant, pipe, stale)
                faults.step("sweep:exec")
                pipe.execute()
                log.warning("job %s: queued but not in RQ's queue; enqueued again", job_id)
                return True
            except redis.WatchError:
                continue


def release_slot_if_done(services: Services, tenant: str, job_id: str) -> bool:
    """Free a quota slot whose job is final or gone (with what else a finished job holds)."""
    jobs = services.jobs
    with services.redis.pipeline() as pipe:
        while True:
            try:
                pipe.watch(jobs.key(job_id))
                raw = pipe.get(jobs.key(job_id))
                record = JobRecord.model_validate_json(raw) if raw else None
                if record is not None and not record.status.is_final:
                    return False
                pipe.multi()
                pipe.srem(jobs.active_key(tenant), job_id)
                pipe.delete(jobs.lease_key(job_id))
                pipe.srem(RUNNING_KEY, job_id)
                pipe.execute()
                log.warning(
                    "job %s: released the quota slot of a %s job",
                    job_id,
                    "missing" if record is None else record.status.value,
                )
                return True
            except redis.WatchError:
                continue


def sweep(services: Services) -> SweepReport:
    """One pass over every unfinished job; returns what it repaired."""
    report = SweepReport()
    jobs = services.jobs
    active = list(jobs.active_jobs())
    held: dict[str, set[str]] = {}  # per model's queue, a snapshot; each repair re-checks its job under WATCH
    popped: dict[str, set[str]] = {}  # per model's queue, the ids popped and not started (a snapshot)
    popped_seen: set[str] = set()
    for tenant, job_id in active:
        record = jobs.get(job_id)
        if record is None or record.status.is_final or record.tenant != tenant:
            if release_slot_if_done(services, tenant, job_id):
                report.released.append(job_id)
        elif record.status == JobStatus.running:
            if not services.redis.exists(jobs.lease_key(job_id)):
                recover_running(services, record, report)
        elif record.status == JobStatus.queued:
            if record.model not in held:
                queue = services.queue_for(record.model)
                held[record.model], popped[record.model] = queue.held_ids(), queue.popped_ids()
            if job_id not in held[record.model] and enqueue_if_lost(services, job_id, record.model):
                report.enqueued.append(job_id)
            elif job_id in popped[record.model] and popped_too_long(services, job_id, record.model, popped_seen):
                report.enqueued.append(job_id)
    forget_popped(services, popped_seen)
    return report


def popped_too_long(services: Services, job_id: str, model: str, seen: set[str]) -> bool:
    """Enqueue a queued job again that RQ popped (it was in the sweep's snapshot of popped ids) but
    no worker has started for :data:`POPPED_GRACE_S`; one transaction, re-checked under WATCH.
    Records when each such job was first seen (``seen`` collects the ones still waiting)."""
    jobs, queue = services.jobs, services.queue_for(model)
    redis_client = services.redis
    now = time.time()
    redis_client.hsetnx(POPPED_SEEN_KEY, job_id, now)
    seen.add(job_id)
    first = float(redis_client.hget(POPPED_SEEN_KEY, job_id) or now)
    if now - first < POPPED_GRACE_S:
        return False
    with redis_client.pipeline() as pipe:
        while True:
            try:
                pipe.watch(jobs.key(job_id), queue.queue.key, queue.intermediate_key, queue.started_key)
                raw = pipe.get(jobs.key(job_id))
                record = JobRecord.model_validate_json(raw) if raw else None
                if (
                    record is None
                    or record.status != JobStatus.queued
                    or pipe.lpos(queue.intermediate_key, job_id) is None
                    or pipe.lpos(queue.queue.key, job_id) is not None
                    or queue.being_started(job_id, pipe)
                ):
                    return False
                stale = queue.fetch(job_id)
                pipe.multi()
                queue.requeue(job_id, record.tenant, pipe, stale)  # out of the popped list, to the front
                pipe.hdel(POPPED_SEEN_KEY, job_id)
                faults.step("sweep:exec")
                pipe.execute()
                seen.discard(job_id)
                log.warning(
                    "job %s: popped %.0f s ago by a worker that never started it; enqueued again", job_id, now - first
                )
                return True
            except redis.WatchError:
                continue


def forget_popped(services: Services, still_popped: set[str]) -> None:
    """Drop the first-seen times of jobs no longer popped and unstarted."""
    stale = [raw.decode() for raw in services.redis.hkeys(POPPED_SEEN_KEY) if raw.decode() not in still_popped]
    if stale:
        services.redis.hdel(POPPED_SEEN_KEY, *stale)
