"""The one place that decides what an exception means for a job: retry, fail, or exit.

* ``transient`` — storage or Redis unreachable: RQ retries the job later;
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

        redis_errors: tuple[type[BaseException], ...] = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
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
