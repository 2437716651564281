"""Prometheus metrics of the API: requests, latency, queue depth, jobs by final status.

Each app has its own registry (several apps can live in one test process). Queue depth and
finished-job counts are read from Redis at scrape time, so every API replica reports the
fleet's numbers, whichever worker finished the job.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .contracts import JobStatus
from .deps import Services
from .jobs import FINISHED_KEY


class QueueCollector:
    """Queue depth and finished jobs per status, from Redis."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self):
        depth = GaugeMetricFamily("megasr_queue_depth", "Jobs waiting in the queue", labels=["queue"])
        finished = CounterMetricFamily("megasr_jobs_finished", "Jobs that reached a final status", labels=["status"])
        try:
            depth.add_metric([self.services.queue.name], self.services.queue.depth())
            counts = self.services.redis.hgetall(FINISHED_KEY)
            for status in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled):
                finished.add_metric([status.value], float(counts.get(status.value.encode(), 0)))
        except Exception:  # Redis down: scrape still answers, without these series
            return
        yield depth
        yield finished


def install_metrics(app: FastAPI, services: Services) -> CollectorRegistry:
    registry = CollectorRegistry()
    requests = Counter("megasr_http_requests", "HTTP requests", ["route", "method", "status"], registry=registry)
    latency = Histogram(
        "megasr_http_request_duration_seconds", "HTTP request latency", ["route", "method"], registry=registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )
    registry.register(QueueCollector(services))

    @app.middleware("http")
    async def _measure(request: Request, call_next):
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            path = getattr(route, "path", "unmatched")
            requests.labels(path, request.method, str(status)).inc()
            latency.labels(path, request.method).observe(time.perf_counter() - start)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return registry
