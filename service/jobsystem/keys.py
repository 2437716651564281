"""Every Redis key of the job system, in one place (RQ keeps its own ``rq:`` keys).

The strings are a storage format: records written by an earlier release are read through the
same names, so a name here never changes without a migration. The webhook outbox
(``service.webhooks``) and the model announcements (``service.models_registry``) keep their
own keys next to their code.

* ``job:<id>``: the job's record (JSON, :class:`service.contracts.JobRecord`);
* ``idem:<tenant>:<key>``: the job an Idempotency-Key created and the hash of its request;
* ``cancel:<id>``: a running job's cancel request;
* ``tenant:<tenant>:active``: the tenant's unfinished jobs (its queue quota);
* ``tenant:<tenant>:jobs`` and ``tenant:<tenant>:status:<status>``: the tenant's jobs scored by
  creation time, all and per status (listings);
* ``running``, ``lease:<id>``: the jobs being run and each one's liveness lease;
* ``outputs:<id>``: every storage key an attempt wrote a result to;
* ``expiry``, ``stats:finished``: finished jobs by deletion time, finished jobs per final status;
* ``fair:<queue key>:tenant``, ``…:served``, ``…:served:clock``: the tenant-fair dequeue's state;
* ``reaper:lock``, ``sweeper:lock``: one reaper pass and one sweep at a time across processes;
* ``sweeper:popped``: when a sweep first saw each queued job that RQ had popped but no worker
  had started (a worker that died between the two leaves it there);
* ``bucket:<name>``: the API's token buckets (``service.rate_limit``).
"""

from __future__ import annotations

from service.contracts import JobStatus

PREFIX = "megasr:"
#: job records: ``JOB_KEY_PREFIX + id``
JOB_KEY_PREFIX = PREFIX + "job:"
RUNNING_KEY = PREFIX + "running"
#: finished job ids scored by when their images are deleted
EXPIRY_KEY = PREFIX + "expiry"
#: finished jobs per final status (metrics)
FINISHED_KEY = PREFIX + "stats:finished"
REAPER_LOCK_KEY = PREFIX + "reaper:lock"
SWEEP_LOCK_KEY = PREFIX + "sweeper:lock"
#: queued job id → when a sweep first saw it popped by RQ and not started (epoch seconds)
POPPED_SEEN_KEY = PREFIX + "sweeper:popped"
#: the quota sets are ``ACTIVE_PREFIX + tenant + ACTIVE_SUFFIX`` (scanned by the sweeper)
ACTIVE_PREFIX, ACTIVE_SUFFIX = PREFIX + "tenant:", ":active"

#: token buckets of the API: submissions, reads, wrong keys per address and per key prefix
SUBMIT_BUCKET = PREFIX + "bucket:submit"
READ_BUCKET = PREFIX + "bucket:read"
AUTH_FAILURE_BUCKET = PREFIX + "bucket:authfail"
AUTH_FAILURE_KEY_BUCKET = PREFIX + "bucket:authfail-key"


def job_key(job_id: str) -> str:
    return JOB_KEY_PREFIX + job_id


def cancel_key(job_id: str) -> str:
    return f"{PREFIX}cancel:{job_id}"


def lease_key(job_id: str) -> str:
    return f"{PREFIX}lease:{job_id}"


def outputs_key(job_id: str) -> str:
    return f"{PREFIX}outputs:{job_id}"


def active_key(tenant: str) -> str:
    return f"{ACTIVE_PREFIX}{tenant}{ACTIVE_SUFFIX}"


def index_key(tenant: str) -> str:
    return f"{PREFIX}tenant:{tenant}:jobs"


def status_index_key(tenant: str, status: JobStatus) -> str:
    return f"{PREFIX}tenant:{tenant}:status:{status.value}"


def idempotency_key(tenant: str, key: str) -> str:
    return f"{PREFIX}idem:{tenant}:{key}"


def fair_tenants_key(queue_key: str) -> str:
    """The tenant of every job waiting in an RQ queue (written in the enqueue's transaction)."""
    return f"{PREFIX}fair:{queue_key}:tenant"


def fair_served_key(queue_key: str) -> str:
    """When each tenant was last served from an RQ queue (a tick of :func:`fair_clock_key`)."""
    return f"{PREFIX}fair:{queue_key}:served"


def fair_clock_key(queue_key: str) -> str:
    return fair_served_key(queue_key) + ":clock"
