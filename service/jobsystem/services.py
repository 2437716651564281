"""``Services``: what every API and worker process holds (settings, Redis, storage, the job store,
the queues, the rate buckets) and ``build_services``, which connects them from settings.

No FastAPI here: the GPU worker builds the same ``Services`` as the API without loading the web
app. What only the HTTP layer holds per process (its read slots) lives on the app itself
(``service.app``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

from service.config import Settings
from service.rate_limit import TokenBucket
from service.storage import Storage, storage_from_url

from . import keys
from .queue import JobQueue
from .store import JobStore


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    storage: Storage
    jobs: JobStore
    #: the RQ queue of every served model (``Settings.served_models``), by model name
    queues: dict[str, JobQueue]
    tenant_keys: dict[str, str]
    #: submissions per tenant (MEGASR_RATE_LIMIT_PER_MINUTE refill, MEGASR_RATE_LIMIT_BURST at once)
    request_rate: TokenBucket = field(init=False)
    #: GETs per tenant (MEGASR_READ_RATE_LIMIT_PER_MINUTE refill, MEGASR_READ_RATE_LIMIT_BURST at once)
    read_rate: TokenBucket = field(init=False)
    #: wrong keys per client address (MEGASR_AUTH_FAILURES_PER_MINUTE); IPv6 clients per /64
    auth_failures: TokenBucket = field(init=False)
    #: wrong keys per presented-key prefix (same budget): address rotation does not reset it
    auth_failures_by_key: TokenBucket = field(init=False)

    def __post_init__(self) -> None:
        settings = self.settings
        self.request_rate = TokenBucket(
            self.redis, keys.SUBMIT_BUCKET, settings.rate_limit_per_minute, settings.rate_limit_burst
        )
        self.read_rate = TokenBucket(
            self.redis, keys.READ_BUCKET, settings.read_rate_limit_per_minute, settings.read_rate_limit_burst
        )
        self.auth_failures = TokenBucket(
            self.redis, keys.AUTH_FAILURE_BUCKET, settings.auth_failures_per_minute, settings.auth_failures_per_minute
        )
        self.auth_failures_by_key = TokenBucket(
            self.redis,
            keys.AUTH_FAILURE_KEY_BUCKET,
            settings.auth_failures_per_minute,
            settings.auth_failures_per_minute,
        )

    @property
    def queue(self) -> JobQueue:
        """The default model's queue. A worker's own is ``queue_for(settings.worker_model)``."""
        return self.queue_for(self.settings.default_model)

    def queue_for(self, model: str) -> JobQueue:
        """The queue of a model's jobs, served here or not: the reaper and the sweeper of any
        process put a job back on its own model's queue (``Settings.queue_for``)."""
        queue = self.queues.get(model)
        if queue is None:
            queue = self.queues.setdefault(
                model, JobQueue(self.redis, self.settings.queue_for(model), self.settings.job_timeout_s)
            )
        return queue


def build_services(settings: Settings) -> Services:
    """Connect Redis, the storage, the job store and every served model's queue, from ``settings``."""
    if not settings.redis_url:
        raise ValueError("MEGASR_REDIS_URL is not set (megasr serve starts an embedded Valkey when it is unset)")
    client = redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30
    )
    storage = storage_from_url(
        settings.resolved_storage_url,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        public_endpoint_url=settings.s3_public_url,
        addressing_style=settings.s3_addressing_style,
    )
    return Services(
        settings=settings,
        redis=client,
        storage=storage,
        jobs=JobStore(client, result_ttl_s=settings.result_ttl_s),
        queues={
            name: JobQueue(client, settings.queue_for(name), settings.job_timeout_s)
            for name in settings.served_models()
        },
        tenant_keys=settings.tenant_keys(),
    )
