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
    runtime = get_runtime()
    jobs, storage, pipeline = runtime.services.jobs, runtime.services.storage, runtime.pipeline
    record = jobs.get(job_id)
    if record is None or record.status.is_final:
        log.info("job %s: nothing to do (%s)", job_id, "missing" if record is None else record.status.value)
        return
    try:
        record = jobs.start(job_id)
    except TransitionRejected as exc:
        log.info("job %s: not started: %s", job_id, exc)
        return
    params = record.params
    last = [0.0]

    def progress(step: int, total: int) -> None:
        now = time.monotonic()
        if step == total or now - last[0] >= PROGRESS_INTERVAL_S:
            last[0] = now
            jobs.set_progress(job_id, step / total)

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
                    should_cancel=lambda: jobs.cancel_requested(job_id),
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
        jobs.finish(job_id, JobStatus.succeeded, output_key=key, output_width=image.width,
                    output_height=image.height, progress=1.0)
        log.info("job %s: succeeded (%d×%d)", job_id, image.width, image.height)
    except PipelineCancelled:
        _finish_quietly(job_id, JobStatus.canceled)
        log.info("job %s: canceled", job_id)
    except (InvalidImageError, ValueError) as exc:
        _finish_quietly(job_id, JobStatus.failed, error=JobError(code="invalid_input", message=str(exc)))
    except Exception as exc:
        kind = classify(exc)
        current = get_current_job()
        retries_left = bool(current and current.retries_left)
        if kind == "fatal" or not retries_left:
            _finish_quietly(job_id, JobStatus.failed, error=JobError(code=kind, message=f"{type(exc).__name__}: {exc}"))
            log.exception("job %s: failed (%s)", job_id, kind)
            if kind == "fatal":
                raise
            return
        try:  # back to queued while RQ waits to retry it
            jobs.transition(job_id, [JobStatus.running], JobStatus.queued, progress=0.0)
        except Exception:
            pass
        log.warning("job %s: %s error, will retry: %s", job_id, kind, exc)
        raise


def _finish_quietly(job_id: str, status: JobStatus, **changes) -> None:
    try:
        get_runtime().services.jobs.finish(job_id, status, **changes)
    except TransitionRejected:
        pass


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
