"""Dynamic batching: after RQ hands this worker a job, claim queued jobs that can share its batch.

A GPU runs eight 512² images per step in about twice the time of one, so a worker that finds
compatible jobs waiting runs them together. Compatible means the same steps, guidance scale,
negative prompt, colour fix, sampler and CFG interval (the pipeline shares them across a batch) and the same size
bucket: the padded working size, which follows from the input size and the scale. Prompts,
seeds and scales stay per job.

Only the worker's own queue (its model's) is scanned: a batch never mixes models.

Claiming is safe against every other worker and the API: in one transaction the job's record
goes ``queued → running`` with this attempt's owner token and lease (the same compare-and-set
as a job RQ hands out: a job canceled or taken meanwhile is skipped), and the job leaves RQ's
queue list and its RQ job is deleted. A worker that popped the same job meanwhile finds no RQ
job, or a running record, and skips it.

The job RQ gives the next worker (the tenant-fair pick of ``service.jobsystem.fair_queue``) is never a
claimed one, and claiming only takes jobs that share a batch with one already running, so a
job that batches with nothing is never starved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megasr_core.parameters import default_steps
from service.contracts import JobRecord, JobStatus, UpscaleParams
from service.jobsystem import keys, lifecycle
from service.jobsystem.queue import JobQueue
from service.jobsystem.services import Services
from service.jobsystem.store import TransitionRejected

log = logging.getLogger("megasr.worker")
#: how many queued jobs one look at the queue inspects
SCAN_DEPTH = 64
POLL_INTERVAL_S = 0.005

Geometry = Callable[[tuple[int, int], float], tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]


def sampling(params: UpscaleParams, defaults: tuple[int, float] | None) -> tuple[int | None, float | None]:
    """A job's (steps, guidance scale), the model's ``defaults`` where it left them out (None:
    the pipeline decides, as it does for its family); a fast sampler's own steps replace the
    model's when the job names none."""
    steps, guidance = params.steps, params.guidance_scale
    if defaults is not None:
        steps = default_steps(params.sampler, defaults[0]) if steps is None else steps
        guidance = defaults[1] if guidance is None else guidance
    return steps, guidance


def batch_key(record: JobRecord, geometry: Geometry, defaults: tuple[int, float] | None = None) -> tuple[Any, ...]:
    """What jobs must share to run in one pipeline call (left-out steps and guidance count as the
    model's ``defaults``: a job that names them batches with one that does not)."""
    params = record.params
    bucket = geometry((record.input_width, record.input_height), params.scale)[2]
    return (
        *sampling(params, defaults),
        params.negative_prompt,
        params.color_fix,
        params.sampler,
        params.cfg_interval,
        bucket,
    )


@dataclass
class Claimed:
    record: JobRecord
    owner: str


class JobClaimer:
    """Finds and claims queued jobs compatible with one already running on this worker."""

    def __init__(
        self,
        services: Services,
        geometry: Geometry,
        max_batch: int,
        wait_s: float,
        queue: JobQueue | None = None,
        defaults: tuple[int, float] | None = None,
    ) -> None:
        self.services = services
        self.geometry = geometry
        self.max_batch = max_batch
        self.wait_s = wait_s
        #: the worker's own queue (its model's); jobs of other models are never batch mates
        self.queue = queue if queue is not None else services.queue_for(services.settings.worker_model)
        self.defaults = defaults

    def claim(self, first: JobRecord, new_owner: Callable[[], str]) -> list[Claimed]:
        """Claim up to ``max_batch - 1`` jobs like ``first``, waiting at most ``wait_s`` for them."""
        wanted = self.max_batch - 1
        if wanted <= 0:
            return []
        key = batch_key(first, self.geometry, self.defaults)
        jobs, queue = self.services.jobs, self.queue
        deadline = time.monotonic() + self.wait_s
        skipped: set[str] = {first.id}
        claimed: list[Claimed] = []
        while True:
            for job_id in queue.waiting_ids(SCAN_DEPTH):
                if job_id in skipped:
                    continue
                skipped.add(job_id)
                record = jobs.get(job_id)
                if (
                    record is None
                    or record.status != JobStatus.queued
                    or record.model != first.model
                    or batch_key(record, self.geometry, self.defaults) != key
                ):
                    continue
                owner = new_owner()
                try:  # running under our lease and out of RQ's queue: one transaction
                    record = lifecycle.claim(jobs, queue, job_id, owner)
                except TransitionRejected:
                    continue  # canceled, or another worker started it first
                claimed.append(Claimed(record, owner))
                if len(claimed) >= wanted:
                    return claimed
            if time.monotonic() >= deadline:
                return claimed
            time.sleep(POLL_INTERVAL_S)


class CancelWatch:
    """Per-job cancel checks for a running batch: one pipelined Redis round trip per interval.

    A job stops when its cancel was requested or it is no longer this attempt's (the reaper gave
    it to another worker after this one was presumed dead).
    """

    def __init__(self, services: Services, owners: dict[str, str], interval_s: float = 0.25) -> None:
        self.services = services
        self.owners = owners
        self.interval_s = interval_s
        self._checked_at = float("-inf")
        self._stopped: set[str] = set()

    def _refresh(self) -> None:
        ids = [job_id for job_id in self.owners if job_id not in self._stopped]
        with self.services.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(keys.cancel_key(job_id))
                pipe.get(keys.job_key(job_id))
            answers = pipe.execute()
        for index, job_id in enumerate(ids):
            cancel, raw = answers[2 * index], answers[2 * index + 1]
            record = JobRecord.model_validate_json(raw) if raw else None
            if cancel or record is None or record.status != JobStatus.running or record.owner != self.owners[job_id]:
                self._stopped.add(job_id)
        self._checked_at = time.monotonic()

    def stopped(self, job_id: str) -> bool:
        if time.monotonic() - self._checked_at >= self.interval_s:
            try:
                self._refresh()
            except Exception as exc:  # a Redis blip must not stop the batch; check again next step
                log.warning("cancel check failed: %s", exc)
        return job_id in self._stopped
