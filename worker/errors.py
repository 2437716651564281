"""The one place that decides what an exception means for a job: retry, fail, or exit.

* ``transient`` — storage unreachable or full (``StorageFull``: ENOSPC, EDQUOT, an S3 quota; the
  worker's ``PatientStorage`` waits these out first) or Redis unreachable: RQ retries the job later;
* ``out_of_memory`` — CUDA OOM: free the cache, retry with smaller tiles, then as transient;
* ``timeout`` — the job ran past ``MEGASR_JOB_TIMEOUT_S``: failed, not retried;
* ``fatal`` — a broken CUDA context: the job fails and the process should exit so the
  orchestrator restarts it;
* ``internal_error`` — anything else: retried, then failed.
"""

from __future__ import annotations


def classify(exc: BaseException) -> str:
    from service.storage import StorageUnavailable

    try:
        import redis

        redis_errors: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
        )
    except ImportError:  # pragma: no cover
        redis_errors = ()
    if isinstance(exc, StorageUnavailable) or isinstance(exc, redis_errors):
        return "transient"
    name = type(exc).__name__
    message = str(exc)
    if name == "JobTimeoutException":
        return "timeout"
    if name == "OutOfMemoryError" or "CUDA out of memory" in message:
        return "out_of_memory"
    if "CUDA error" in message or "cuDNN error" in message or "device-side assert" in message:
        return "fatal"
    return "internal_error"


class FatalWorkerError(RuntimeError):
    """Raised by the task after a fatal error: the worker stops taking jobs and exits non-zero."""


#: what a tenant reads for each failure kind: fixed text, never the exception's (which can hold
#: paths, hostnames or other tenants' data); the exception itself goes to the worker log
_SAFE_MESSAGES = {
    "internal_error": "the job failed inside the worker; it was retried {retries} times",
    "transient": "storage was unreachable or full, or the job queue unreachable; the job was retried {retries} times",
    "out_of_memory": "the GPU ran out of memory, even with the smallest tiles; the job was retried {retries} times",
    "timeout": "the job ran past the worker's time limit (MEGASR_JOB_TIMEOUT_S)",
    "fatal": "the worker's GPU failed while running the job; the worker restarts",
    "invalid_input": "the image or its parameters cannot be processed",
}


def safe_message(kind: str, attempts: int) -> str:
    """The tenant-facing message of a failure of ``kind`` after ``attempts`` attempts."""
    template = _SAFE_MESSAGES.get(kind, _SAFE_MESSAGES["internal_error"])
    return template.format(retries=max(0, attempts - 1))
