"""The ``upscale`` job, as RQ runs it in the worker process (no fork), with dynamic batching.

RQ hands the worker one job. The worker starts it, claims queued jobs that can share its batch
(``worker.batching``; up to ``MEGASR_MAX_BATCH``, waiting ``MEGASR_BATCH_WAIT_MS`` for them),
and runs them all in one pipeline call: per-job seeds, prompts and scales, throttled progress
for each, and a cancel check per job at every step (a canceled job leaves the batch, the others
go on). Steps and guidance a job left out are the model's defaults (its family's; a fast
sampler's own steps). The batch's inputs are fetched and decoded side by side (those of the jobs
waiting next are prefetched while the GPU runs, ``worker.prefetch``), and its results encoded
and written to storage side by side, each job's record finished under its own owner token,
with the worker's ``ModelInfo`` (``record.model_info``: which model ran it, and whether it is
trained).

Failures stay with their job: an unreadable image fails only its own job before the batch
runs; out of GPU memory halves the batch (then shrinks the tiles of a single job); any other
error in a batch re-runs its jobs one by one so that only the culprit fails. Transient failures
(storage, Redis) are retried: the job RQ handed out by RQ's retry, a claimed job by putting it
back at the front of the queue; the last attempt marks the job failed. A job that is already
final is never run again.
"""

from __future__ import annotations

import contextvars
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rq import get_current_job

from megasr_core.output_formats import encode
from service import faults, tracing
from service.contracts import CONTENT_TYPES, JobError, JobRecord, JobStatus, attempt_output_key
from service.jobsystem import lifecycle
from service.jobsystem.store import TransitionRejected
from service.jobsystem.sweeper import MAX_ATTEMPTS
from service.logging_setup import bind_log_context, fresh_log_context, log_fields
from service.storage import PatientStorage

from .batching import CancelWatch, sampling
from .errors import FatalWorkerError, classify, safe_message
from .runtime import WorkerRuntime, get_runtime

log = logging.getLogger("megasr.worker")
PROGRESS_INTERVAL_S = 0.5
RETRY_BACKOFF_S = 3.0
#: (latent tile size, tiles per model batch) tried in turn when one job alone runs out of GPU
#: memory: all of an image's tiles in one model batch (up to 16: a 2048² output has 9), 4, then
#: one at a time, then smaller tiles. The worker starts later jobs at the batching that fitted
#: (``WorkerRuntime.tile_batch_cap``), so a GPU that cannot hold 16 tiles fails over once.
OOM_TILE_SIZES = ((None, 16), (None, 4), (None, 1), (64, 1), (48, 1))


def first_rung(cap: int) -> int:
    """The first rung of :data:`OOM_TILE_SIZES` within a worker's tile batch ``cap``."""
    return next(i for i, (size, per_batch) in enumerate(OOM_TILE_SIZES) if size is not None or per_batch <= cap)


#: inputs of one batch fetched and decoded, and results encoded and uploaded, at once, at most
STORE_THREADS = 8


def side_by_side(work: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """``work`` on every item in up to :data:`STORE_THREADS` threads, each call in its own copy of
    the log context; the results in order. An exception (a ``faults.Crash`` too) is raised once
    every call has settled."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(items), STORE_THREADS))) as pool:
        futures = [pool.submit(contextvars.copy_context().run, work, item) for item in items]
    return [future.result() for future in futures]


@dataclass(frozen=True)
class BatchOutcome:
    """What every job of a finished pipeline call records: its stage timings, start, duration, tagger."""

    timings: dict[str, Any]
    started_ns: int
    elapsed: float
    tagger: str | None
    batch_size: int


@dataclass
class Member:
    """One job of a batch: its record, this attempt's owner token, and its decoded input."""

    record: JobRecord
    owner: str
    primary: bool  # the job RQ handed out (its retries are RQ's)
    image: Any = None
    seed: int = 0

    @property
    def id(self) -> str:
        return self.record.id


@fresh_log_context  # what this job binds ends with it
def upscale(job_id: str) -> None:
    """RQ entry point: run one attempt of the job (and of its batch mates), unless it is final or taken."""
    runtime = get_runtime()
    jobs = runtime.services.jobs
    record = jobs.get(job_id)
    bind_log_context(job_id=job_id, tenant=record and record.tenant, worker=runtime.name, stage="start")
    if record is None or record.status.is_final:
        log.info("job %s: nothing to do (%s)", job_id, "missing" if record is None else record.status.value)
        return
    owner = runtime.new_owner()
    try:
        record = jobs.start(job_id, owner)
    except TransitionRejected as exc:
        log.info("job %s: not started: %s", job_id, exc)
        return
    faults.step("task:after_start")
    members = [Member(record, owner, primary=True)]
    runtime.running[job_id] = owner
    started = time.monotonic()
    try:
        claimer = runtime.claimer()
        if claimer is not None:
            try:
                for mate in claimer.claim(record, runtime.new_owner):
                    members.append(Member(mate.record, mate.owner, primary=False))
                    runtime.running[mate.record.id] = mate.owner
            except Exception as exc:  # a Redis blip while looking for mates: run what we have
                log.warning("job %s: could not claim batch mates: %s", job_id, exc)
        for member in members:
            if member.record.started_at is not None:
                runtime.metrics.queue_wait.observe(
                    max(0.0, (member.record.started_at - member.record.created_at).total_seconds())
                )
        if len(members) > 1:
            log.info("job %s: batched with %s", job_id, ", ".join(m.id for m in members[1:]))
        BatchRun(runtime, members).run()
    finally:
        for member in members:
            runtime.running.pop(member.id, None)
        log.info(
            "job %s: attempt %s done in %.1f s (%d job(s))", job_id, owner, time.monotonic() - started, len(members)
        )


class BatchRun:
    """One pipeline call (or, after a failure, several smaller ones) for the members of a batch."""

    def __init__(self, runtime: WorkerRuntime, members: list[Member]) -> None:
        self.runtime = runtime
        self.members = members
        self.jobs = runtime.services.jobs
        # A store restart (10-20 s) must not fail work the GPU has already done.
        self.storage = PatientStorage(runtime.services.storage, patience_s=runtime.storage_patience_s)
        self.reraise: BaseException | None = None  # for RQ: the primary's retry, or FatalWorkerError
        # RQ's current job lives in this thread's stack; results are stored from a thread pool.
        self.rq_job = get_current_job()

    def run(self) -> None:
        from .input_image import load_input

        bind_log_context(stage="load")

        prefetched = self.runtime.prefetcher()

        def load(member: Member) -> BaseException | None:
            try:
                image = prefetched.take(member.id, member.record.input_key) if prefetched is not None else None
                # the API's decode budgets again (worker.input_image): no minutes of CPU on one input
                member.image = image or load_input(
                    self.storage.get(member.record.input_key), self.runtime.services.settings
                )
                return None
            except Exception as exc:
                return exc

        for member in self.members:
            params = member.record.params
            # The API records a seed on every job (drawn when the client sent none); records from
            # before it did have none and get one drawn here.
            member.seed = params.seed if params.seed is not None else secrets.randbelow(2**63)
        # The batch's inputs are fetched and decoded side by side (storage round trips, PNG decodes).
        loaded = side_by_side(load, self.members)
        ready = []
        for member, problem in zip(self.members, loaded):
            if problem is None:
                ready.append(member)
            else:  # an unreadable image fails its job; a storage error retries it
                self.handle_error(member, problem)
        self.execute(ready, tile_index=0)
        if self.reraise is not None:
            raise self.reraise

    def execute(self, group: list[Member], tile_index: int) -> None:
        if not group:
            return
        # not above the tile batching this worker has learnt fits (a half of a split batch included)
        tile_index = max(tile_index, first_rung(self.runtime.tile_batch_cap))
        from megasr_core.pipelines import PipelineCancelled

        # steps, guidance, negative prompt, colour fix, sampler, CFG interval: shared by the batch
        params = group[0].record.params
        steps, guidance = sampling(params, self.runtime.sampling_defaults())  # left out: the model's defaults
        watch = CancelWatch(self.runtime.services, {m.id: m.owner for m in group})
        last = [0.0]

        def progress(step: int, total: int) -> None:
            now = time.monotonic()
            if step == total or now - last[0] >= PROGRESS_INTERVAL_S:
                last[0] = now
                for member in group:
                    if not watch.stopped(member.id):
                        self.jobs.set_progress(member.id, step / total, owner=member.owner)

        started, started_ns = time.monotonic(), time.time_ns()
        prefetcher = self.runtime.prefetcher()
        if prefetcher is not None:  # the next batch's inputs, fetched and decoded while the GPU runs
            prefetcher.prefetch_next(self.runtime.max_batch, skip={m.id for m in self.members})
        bind_log_context(stage="pipeline")
        self.runtime.metrics.batch_size.observe(len(group))
        try:
            result = self.runtime.pipeline(
                [m.image for m in group],
                scale=[m.record.params.scale for m in group],
                prompt=[m.record.params.prompt for m in group],
                seed=[m.seed for m in group],
                num_inference_steps=steps,
                guidance_scale=guidance,
                negative_prompt=params.negative_prompt,
                color_fix=params.color_fix,
                tile_size=OOM_TILE_SIZES[tile_index][0],
                tile_batch_size=OOM_TILE_SIZES[tile_index][1],
                callback=progress,
                is_cancelled=lambda index: watch.stopped(group[index].id),
                # the group is one bucket: one model batch, padded up to the worker's batch at most
                max_batch_size=max(len(group), self.runtime.max_batch),
                sampler=params.sampler,
                cfg_interval=params.cfg_interval,
            )
        except Exception as exc:
            kind = classify(exc)
            if kind == "out_of_memory":
                _free_cuda_cache()
                if len(group) > 1:
                    half = len(group) // 2
                    log.warning("out of GPU memory with %d jobs: splitting the batch in two", len(group))
                    self.execute(group[:half], tile_index)
                    self.execute(group[half:], tile_index)
                    return
                if tile_index + 1 < len(OOM_TILE_SIZES):
                    size, per_batch = OOM_TILE_SIZES[tile_index + 1]
                    if size is None and per_batch < self.runtime.tile_batch_cap:
                        self.runtime.tile_batch_cap = per_batch  # later jobs start there
                    log.warning(
                        "job %s: out of GPU memory, retrying with tiles (size, per batch) %s",
                        group[0].id,
                        OOM_TILE_SIZES[tile_index + 1],
                    )  # pragma: no mutate
                    self.execute(group, tile_index + 1)
                    return
            elif len(group) > 1 and kind not in ("fatal", "timeout") and not isinstance(exc, PipelineCancelled):
                # (A timeout has used up the job's time: re-running would outlive it.)
                log.warning(
                    "batch of %d failed (%s: %s): running its jobs one by one", len(group), type(exc).__name__, exc
                )
                for member in group:
                    self.execute([member], tile_index)
                return
            for member in group:
                self.handle_error(member, exc)
            return
        elapsed = time.monotonic() - started
        extractors = getattr(self.runtime.pipeline, "extractors", None)
        tagger = getattr(extractors, "tagger_name", None)  # recorded on each job: RAM or the CLIP fallback
        # Encode and upload the batch's results side by side (a 512² PNG takes ~40 ms of CPU, a
        # 2048² one ~0.6 s; the encoders and the uploads release the GIL), each in its own copy of
        # the log context. A crash on one (a BaseException) is re-raised once all have settled.
        outcome = BatchOutcome(result.timings, started_ns, elapsed, tagger, len(group))
        side_by_side(lambda pair: self.store(*pair, outcome), list(zip(group, result.images)))

    def store(self, member: Member, image: Any, outcome: BatchOutcome) -> None:
        """Encode and upload one job's result and finish its record (canceled when ``image`` is None)."""
        # This job's trace (continued from the API's enqueue span): the batch's stages, then its upload.
        with (
            log_fields(job_id=member.id, tenant=member.record.tenant, stage="store"),
            tracing.span(
                "worker.job",
                member.record.trace_context,
                start_ns=outcome.started_ns,
                job_id=member.id,
                worker=self.runtime.name,
                batch_size=outcome.batch_size,
            ),
        ):
            tracing.record_stages(outcome.timings, outcome.started_ns, batch_size=outcome.batch_size)
            if image is None:
                self.finish_canceled(member)
                return
            try:
                fmt = member.record.params.output_format
                # This attempt's own key: a presumed-dead attempt that wakes up late writes beside
                # the finished result, never over it (the record names the result's key).
                key = attempt_output_key(member.id, member.owner, fmt)
                self.jobs.note_output(member.id, key)
                with tracing.span("store", job_id=member.id, format=fmt):
                    self.storage.put(key, encode(image, fmt), CONTENT_TYPES[fmt])
                faults.step("task:after_output")
                self.jobs.finish(
                    member.id,
                    JobStatus.succeeded,
                    owner=member.owner,
                    output_key=key,
                    tagger=outcome.tagger,
                    model_info=self.runtime.model_info(),
                    output_width=image.width,
                    output_height=image.height,
                    progress=1.0,
                )
            except TransitionRejected:
                log.warning("job %s: taken over by another worker; this attempt's result is dropped", member.id)
                return
            except Exception as exc:
                self.handle_error(member, exc)
                return
            self.runtime.metrics.observe(outcome.timings, outcome.elapsed, "succeeded")
            log.info("job %s: succeeded (%d×%d)", member.id, image.width, image.height)

    def finish_canceled(self, member: Member) -> None:
        if _finish_quietly(member.id, JobStatus.canceled, member.owner):
            self.runtime.metrics.jobs.labels("canceled").inc()
            log.info("job %s: canceled", member.id)
        else:
            log.warning("job %s: taken over by another worker; this attempt stops", member.id)

    def handle_error(self, member: Member, exc: BaseException) -> None:
        """Fail, cancel or retry one member after ``exc``. The tenant sees a code and a fixed
        message (``worker.errors.safe_message``); the exception goes to this worker's log."""
        from megasr_core.pipelines import InvalidImageError, PipelineCancelled

        job_id, owner = member.id, member.owner
        if isinstance(exc, PipelineCancelled):
            self.finish_canceled(member)
            return
        if isinstance(exc, ValueError):
            # InvalidImageError's messages are our own, written for users; any other ValueError's are not.
            message = str(exc) if isinstance(exc, InvalidImageError) else safe_message("invalid_input", 1)
            log.warning("job %s: invalid input: %s: %s", job_id, type(exc).__name__, exc)
            if _finish_quietly(job_id, JobStatus.failed, owner, error=JobError(code="invalid_input", message=message)):
                self.runtime.metrics.jobs.labels("failed").inc()  # not when the job was taken over meanwhile
            return
        kind = classify(exc)
        if member.primary:
            retries_left = bool(self.rq_job and self.rq_job.retries_left)
        else:
            retries_left = member.record.attempts < MAX_ATTEMPTS
        if kind in ("fatal", "timeout") or not retries_left:
            log.error(
                "job %s: failed (%s) after %d attempt(s)",
                job_id,
                kind,
                member.record.attempts,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
            if _finish_quietly(
                job_id,
                JobStatus.failed,
                owner,
                error=JobError(code=kind, message=safe_message(kind, member.record.attempts)),
            ):
                self.runtime.metrics.jobs.labels("failed").inc()
            if kind == "fatal":
                # The process exits (worker.main); the orchestrator restarts it with a fresh CUDA context.
                self.reraise = FatalWorkerError(f"fatal error in job {job_id}: {type(exc).__name__}: {exc}")
                self.reraise.__cause__ = exc
            return
        log.warning("job %s: %s error, will retry: %s: %s", job_id, kind, type(exc).__name__, exc)
        try:  # back to queued for another attempt, lease dropped: one transaction
            # A claimed job has no RQ retry of its own: it goes back to RQ's queue in the same
            # transaction. The job RQ handed out is re-queued by RQ's Retry once we re-raise.
            if member.primary:
                self.jobs.requeue(job_id, owner, None)
            else:
                lifecycle.requeue(self.jobs, self.runtime.services.queue_for(member.record.model), job_id, owner)
        except TransitionRejected:
            return  # canceled or taken over meanwhile: nothing of ours to retry
        except Exception as requeue_error:  # Redis down: the lease expires and the reaper re-queues it
            log.warning("job %s: could not re-queue: %s", job_id, requeue_error)
        faults.step("task:after_requeue")
        if member.primary and not isinstance(self.reraise, FatalWorkerError):
            time.sleep(RETRY_BACKOFF_S)
            self.reraise = exc  # RQ's Retry runs it again


def _finish_quietly(job_id: str, status: JobStatus, owner: str, **changes) -> bool:
    """Finish one of this worker's attempts (recording the model that ran it); False when the
    job has moved on meanwhile (canceled, taken over)."""
    runtime = get_runtime()
    try:
        runtime.services.jobs.finish(job_id, status, owner=owner, model_info=runtime.model_info(), **changes)
        return True
    except TransitionRejected:
        return False


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
