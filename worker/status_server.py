"""The worker's own Prometheus metrics and its /metrics, /healthz, /readyz endpoint.

``/healthz`` is liveness: 503 once the thread running the job loop has died, or once the
background loop (lease renewal, reaper: ``WorkerRuntime.start_background``) has stopped beating
for :data:`HEARTBEAT_STALE_S`: it stops when the job loop ends, and a worker whose leases lapse
loses its jobs to others. While the model loads, before any beat, it answers 200. ``/readyz``
says which model the worker serves (``{"status", "model": ModelInfo}``), untrained or not.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: seconds without a heartbeat after which the worker is not alive (the loop beats every 5 s)
HEARTBEAT_STALE_S = 30.0


class WorkerMetrics:
    def __init__(self, heartbeat_stale_s: float = HEARTBEAT_STALE_S) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter(
            "megasr_worker_jobs", "Jobs this worker finished, by outcome", ["status"], registry=self.registry
        )
        self.stage_seconds = Histogram(
            "megasr_worker_stage_seconds",
            "Seconds per pipeline stage",
            ["stage"],
            registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.job_seconds = Histogram(
            "megasr_worker_job_seconds",
            "Seconds per job",
            registry=self.registry,
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
        )
        self.batch_size = Histogram(
            "megasr_worker_batch_size",
            "Jobs per pipeline call",
            registry=self.registry,
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
        )
        self.queue_wait = Histogram(
            "megasr_worker_queue_wait_seconds",
            "Seconds from submission to the start of an attempt",
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
        )
        self.ready = Gauge("megasr_worker_ready", "1 once the model is loaded and warmed up", registry=self.registry)
        self.gpu_memory = Gauge(
            "megasr_worker_gpu_memory_bytes", "GPU memory allocated by torch", registry=self.registry
        )
        self.gpu_memory.set_function(_gpu_memory)
        self.is_ready = False
        self.heartbeat_stale_s = heartbeat_stale_s
        self.last_beat: float | None = None  # time.monotonic() of the last heartbeat
        self.job_loop: threading.Thread | None = None
        #: the model this worker serves: its name, then its ``ModelInfo`` once loaded (in /readyz)
        self.model: dict | None = None

    def beat(self) -> None:
        """The background loop is alive (called every few seconds)."""
        self.last_beat = time.monotonic()

    def watch(self, job_loop: threading.Thread) -> None:
        """Liveness also requires this thread (the one running the job loop) to be alive."""
        self.job_loop = job_loop

    def liveness(self) -> tuple[bool, str]:
        """(alive, why not)."""
        if self.job_loop is not None and not self.job_loop.is_alive():
            return False, "the job loop has stopped"
        if self.last_beat is not None and time.monotonic() - self.last_beat > self.heartbeat_stale_s:
            return False, f"no heartbeat for {time.monotonic() - self.last_beat:.0f} s"
        return True, "ok"

    def mark_ready(self) -> None:
        self.is_ready = True
        self.ready.set(1)

    def observe(self, timings: dict[str, float], total: float, status: str) -> None:
        for stage, seconds in timings.items():
            if stage not in ("total", "denoise_step_median"):
                self.stage_seconds.labels(stage).observe(seconds)
        self.job_seconds.observe(total)
        self.jobs.labels(status).inc()

    def serve(self, host: str, port: int) -> ThreadingHTTPServer:
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path == "/metrics":
                    body, status, kind = generate_latest(metrics.registry), 200, CONTENT_TYPE_LATEST
                elif self.path == "/healthz":
                    alive, why = metrics.liveness()
                    body = json.dumps({"status": "ok"} if alive else {"status": "dead", "reason": why}).encode()
                    status, kind = (200 if alive else 503), "application/json"
                elif self.path == "/readyz":
                    ready = metrics.is_ready
                    answer = {
                        "status": "ready" if ready else "loading",
                        **({"model": metrics.model} if metrics.model else {}),
                    }
                    body = json.dumps(answer).encode()
                    status, kind = (200 if ready else 503), "application/json"
                else:
                    body, status, kind = (
                        b'{"error": {"code": "not_found", "message": "no such path"}}',
                        404,
                        "application/json",
                    )
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return

        server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=server.serve_forever, name="megasr-worker-metrics", daemon=True).start()
        return server


def _gpu_memory() -> float:
    try:
        import torch

        return float(torch.cuda.memory_allocated()) if torch.cuda.is_available() else 0.0
    except Exception:
        return 0.0
