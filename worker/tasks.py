"""The ``upscale`` job, as RQ runs it in the worker process (no fork).

Reads the record and the input image, runs the pipeline with throttled progress and a cancel
check every step, writes the result to storage, and finishes the record. A job that is already
final is never run again; transient failures (storage, Redis, CUDA out of memory) are retried
by RQ, and the last attempt marks the job failed.
"""

from __future__ import annotations

import io
import logging
import time

from rq import get_current_job

from service.contracts import CONTENT_TYPES, JobError, JobStatus, output_key
from service.jobs import TransitionRejected

from .errors import classify
from .runtime import get_runtime

log = logging.getLogger("megasr.worker")
PROGRESS_INTERVAL_S = 0.5
RETRY_BACKOFF_S = 3.0
#: latent tile sizes tried in turn when the GPU runs out of memory
OOM_TILE_SIZES = (None, 64, 48)


def _encode(image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=95)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def upscale(job_id: str) -> None:
    """RQ entry point: run one attempt of the job, unless it is already final or taken."""
    runtime = get_runtime()
    jobs = runtime.services.jobs
    record = jobs.get(job_id)
    if record is None or record.status.is_final:
        log.info("job %s: nothing to do (%s)", job_id, "missing" if record is None else record.status.value)
        return
    owner = runtime.new_owner()
    try:
        record = jobs.start(job_id, owner)
    except TransitionRejected as exc:
        log.info("job %s: not started: %s", job_id, exc)
        return
    runtime.current = (job_id, owner)
    started = time.monotonic()
    try:
        _run(runtime, record, owner)
    finally:
        runtime.current = None
        log.info("job %s: attempt %s done in %.1f s", job_id, owner, time.monotonic() - started)


def _run(runtime, record, owner: str) -> None:
    jobs, storage, pipeline = runtime.services.jobs, runtime.services.storage, runtime.pipeline
    job_id, params = record.id, record.params
    last = [0.0]
    started = time.monotonic()

    def progress(step: int, total: int) -> None:
        now = time.monotonic()
        if step == total or now - last[0] >= PROGRESS_INTERVAL_S:
            last[0] = now
            jobs.set_progress(job_id, step / total, owner=owner)

    def should_cancel() -> bool:
        # A cancel request, or the job was taken over (this worker was presumed dead).
        return jobs.cancel_requested(job_id) or not jobs.still_owner(job_id, owner)

    from megasr_core.pipelines import InvalidImageError, PipelineCancelled

    try:
        data = storage.get(record.input_key)
        result = None
        for tile_size in OOM_TILE_SIZES:
            try:
                result = pipeline(
                    data, scale=params.scale, num_inference_steps=params.steps, guidance_scale=params.guidance_scale,
                    prompt=params.prompt, negative_prompt=params.negative_prompt, seed=params.seed,
                    color_fix=params.color_fix, tile_size=tile_size, callback=progress,
                    should_cancel=should_cancel,
                )
                break
            except Exception as exc:  # only out-of-memory goes round again with smaller tiles
                if classify(exc) != "out_of_memory" or tile_size == OOM_TILE_SIZES[-1]:
                    raise
                log.warning("job %s: out of GPU memory, retrying with %s-latent tiles", job_id, OOM_TILE_SIZES[-1])
                _free_cuda_cache()
        image = result.images[0]
        fmt = params.output_format
        key = output_key(job_id, fmt)
        storage.put(key, _encode(image, fmt), CONTENT_TYPES[fmt])
        jobs.finish(job_id, JobStatus.succeeded, owner=owner, output_key=key, output_width=image.width,
                    output_height=image.height, progress=1.0)
        runtime.metrics.observe(result.timings, time.monotonic() - started, "succeeded")
        log.info("job %s: succeeded (%d×%d)", job_id, image.width, image.height)
    except PipelineCancelled:
        if _finish_quietly(job_id, JobStatus.canceled, owner):
            runtime.metrics.jobs.labels("canceled").inc()
            log.info("job %s: canceled", job_id)
        else:
            log.warning("job %s: taken over by another worker; this attempt stops", job_id)
    except (InvalidImageError, ValueError) as exc:
        _finish_quietly(job_id, JobStatus.failed, owner, error=JobError(code="invalid_input", message=str(exc)))
        runtime.metrics.jobs.labels("failed").inc()
    except Exception as exc:
        kind = classify(exc)
        current = get_current_job()
        retries_left = bool(current and current.retries_left)
        if kind in ("fatal", "timeout") or not retries_left:
            _finish_quietly(job_id, JobStatus.failed, owner, error=JobError(code=kind, message=f"{type(exc).__name__}: {exc}"))
            runtime.metrics.jobs.labels("failed").inc()
            log.exception("job %s: failed (%s)", job_id, kind)
            if kind == "fatal":
                raise  # the process exits; the orchestrator restarts it with a fresh CUDA context
            return
        try:  # back to queued while RQ retries it
            jobs.transition(job_id, [JobStatus.running], JobStatus.queued, expect_owner=owner, owner=None, progress=0.0)
            jobs.release(job_id, owner)
        except Exception:
            pass
        log.warning("job %s: %s error, will retry: %s", job_id, kind, exc)
        time.sleep(RETRY_BACKOFF_S)
        raise


def _finish_quietly(job_id: str, status: JobStatus, owner: str, **changes) -> bool:
    try:
        get_runtime().services.jobs.finish(job_id, status, owner=owner, **changes)
        return True
    except TransitionRejected:
        return False


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
