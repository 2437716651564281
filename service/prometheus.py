"""Prometheus metrics of the API: requests, latency, queue depth, running jobs, jobs by final
status, build info and the process (CPU, memory, file descriptors; ``ProcessCollector``).

Each app has its own registry (several apps can live in one test process). Queue depth and
finished-job counts are read from Redis at scrape time, so every API replica reports the
fleet's numbers, whichever worker finished the job.

Label values are bounded whatever clients send: the method is one of a fixed set (else "other")
and the route is the matched route's template (else "unmatched"), so random methods and paths
cannot grow the registry. In ``megasr serve`` the in-process worker's metrics
(``megasr_worker_*``, ``service.local_workers``) are served here too. ``/metrics`` itself needs
``MEGASR_METRICS_KEY`` as a bearer token; without
that key it is served only by an anonymous (loopback development) app.
"""

from __future__ import annotations

import hmac
import time
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import local_workers
from .contracts import JobStatus
from .deps import BEARER_CHALLENGE, bearer_token, client_address, record_auth_failure, refuse_if_guessing
from .errors import ApiError
from .jobsystem.keys import FINISHED_KEY, RUNNING_KEY
from .jobsystem.services import Services
from .redis_health import redis_persistence
from .webhooks import DROPPED_KEY

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def method_label(method: str) -> str:
    """The request method as a label: one of a fixed set, anything else is "other"."""
    return method if method in METHODS else "other"


def route_label(request: Request) -> str:
    """The matched route's template (``/v1/jobs/{job_id}``), never the raw path."""
    path = getattr(request.scope.get("route"), "path", None)
    return path if isinstance(path, str) else "unmatched"


def check_metrics_access(request: Request, services: Services) -> None:
    """Bearer ``MEGASR_METRICS_KEY`` when set; without it, only an anonymous app serves /metrics."""
    key = services.settings.metrics_key
    if key is None:
        if services.tenant_keys:
            raise ApiError(
                403,
                "metrics_disabled",
                "/metrics needs MEGASR_METRICS_KEY (sent as a bearer token) when API keys are configured",
            )
        return
    token = bearer_token(request)
    if token is None:
        raise ApiError(
            401, "unauthorized", "missing metrics key: send 'Authorization: Bearer METRICS_KEY'", BEARER_CHALLENGE
        )
    if not hmac.compare_digest(key.get_secret_value().encode(), token.encode()):  # the key first: never locked out
        client = client_address(request)
        refuse_if_guessing(services, client, token)
        record_auth_failure(services, client, token)
        raise ApiError(401, "unauthorized", "invalid metrics key", BEARER_CHALLENGE)


def package_version() -> str:
    try:
        return version("megasr")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


class QueueCollector:
    """Queue depth, running jobs and finished jobs per status, from Redis."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self):
        depth = GaugeMetricFamily("megasr_queue_depth", "Jobs waiting in the queue", labels=["queue"])
        running = GaugeMetricFamily("megasr_jobs_running", "Jobs a worker is running now (all workers)")
        finished = CounterMetricFamily("megasr_jobs_finished", "Jobs that reached a final status", labels=["status"])
        dropped = CounterMetricFamily(
            "megasr_webhooks_dropped",
            "Webhook deliveries given up (fleet-wide): over a tenant's backlog cap, or after the last attempt",
            labels=["reason"],
        )
        try:
            for model in self.services.settings.served_models():  # one series per model's queue
                queue = self.services.queue_for(model)
                depth.add_metric([queue.name], queue.depth())
            running.add_metric([], float(self.services.redis.scard(RUNNING_KEY)))
            counts = self.services.redis.hgetall(FINISHED_KEY)
            for status in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled):
                finished.add_metric([status.value], float(counts.get(status.value.encode(), 0)))
            given_up = self.services.redis.hgetall(DROPPED_KEY)
            for reason in ("backlog", "attempts"):
                dropped.add_metric([reason], float(given_up.get(reason.encode(), 0)))
        except Exception:  # Redis down: scrape still answers, without these series
            return
        yield depth
        yield running
        yield finished
        yield dropped


class RedisPersistenceCollector:
    """``megasr_redis_persistence_enabled``: 1 with AOF or RDB snapshots, 0 with neither (a Redis
    restart loses the accepted jobs); no sample while Redis cannot say (``service.redis_health``)."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self):
        persisted = redis_persistence(self.services.redis)
        if persisted is not None:
            yield GaugeMetricFamily(
                "megasr_redis_persistence_enabled",
                "Whether Redis keeps accepted jobs across a restart (AOF or RDB)",
                value=float(persisted),
            )


class LocalWorkerCollector:
    """The metrics of the workers running in this process for the app's queue (``megasr serve``)."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self):
        settings = self.services.settings
        for model in settings.served_models():
            for worker in local_workers.serving(settings.redis_url, settings.queue_for(model)):
                if worker.registry is not None:
                    yield from worker.registry.collect()


def install_metrics(app: FastAPI, services: Services) -> CollectorRegistry:
    registry = CollectorRegistry()
    requests = Counter("megasr_http_requests", "HTTP requests", ["route", "method", "status"], registry=registry)
    latency = Histogram(
        "megasr_http_request_duration_seconds",
        "HTTP request latency",
        ["route", "method"],
        registry=registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )
    registry.register(QueueCollector(services))
    registry.register(LocalWorkerCollector(services))
    registry.register(RedisPersistenceCollector(services))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    Gauge("megasr_build_info", "The running MegaSR version (always 1)", ["version"], registry=registry).labels(
        package_version()
    ).set(1)

    @app.middleware("http")
    async def _measure(request: Request, call_next):
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route, method = route_label(request), method_label(request.method)
            requests.labels(route, method, str(status)).inc()
            latency.labels(route, method).observe(time.perf_counter() - start)

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        check_metrics_access(request, services)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return registry
