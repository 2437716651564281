"""What a worker process holds for its whole life: services, the pipeline, its current job.

The pipeline is loaded once (fp16 on CUDA) before the worker takes jobs; tasks reach it here.
A worker serves one model, ``MEGASR_MODEL`` (``Settings.worker_model``), from that model's
queue. A background thread renews the leases of the jobs being run (all of a batch), re-queues
the jobs of dead workers (``service.jobsystem.reaper``) and, once the worker is ready, announces the
model it serves (``service.models_registry``: ``GET /v1/models``).
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from service import models_registry
from service.config import Settings
from service.contracts import ModelInfo
from service.jobsystem.queue import JobQueue
from service.jobsystem.reaper import delete_expired_results, reap_abandoned
from service.jobsystem.services import Services, build_services

from .batching import JobClaimer
from .prefetch import InputPrefetcher
from .status_server import WorkerMetrics

log = logging.getLogger("megasr.worker")
_RUNTIME: WorkerRuntime | None = None


@dataclass
class WorkerRuntime:
    services: Services
    pipeline: Any  # megasr_core.MegaSRPipeline (imported lazily: torch)
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    name: str = field(default_factory=lambda: f"worker-{uuid.uuid4().hex[:8]}")
    running: dict[str, str] = field(default_factory=dict)  # job id → owner token, for every job of the batch
    #: how long a job's storage reads and writes wait out an outage before the job's retry takes over
    storage_patience_s: float = 45.0
    #: latent tiles per model batch a large job starts with: all of an image's tiles (up to 16)
    #: while the GPU holds them, lowered for good at this worker's first out-of-memory error
    #: (``worker.tasks.OOM_TILE_SIZES``); only the batching, never the tile size, is remembered
    tile_batch_cap: int = 16
    #: inputs of the next waiting jobs, fetched and decoded while the GPU runs (``worker.prefetch``)
    _prefetcher: Any = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _announced: bool = False
    _announce_lock: threading.Lock = field(default_factory=threading.Lock)

    def new_owner(self) -> str:
        return f"{self.name}:{uuid.uuid4().hex[:8]}"

    @property
    def model_name(self) -> str:
        return self.services.settings.worker_model

    @property
    def queue(self) -> JobQueue:
        """This worker's queue: its model's (``Settings.queue_for``)."""
        return self.services.queue_for(self.model_name)

    def model_info(self) -> ModelInfo | None:
        """The model this worker runs, as jobs record it and ``/v1/models`` shows it (None before
        the pipeline is loaded, or for a pipeline that does not say what it is)."""
        identity = getattr(self.pipeline, "identity", None)
        if identity is None:
            return None
        return ModelInfo(name=self.model_name, **identity.to_dict())

    def sampling_defaults(self) -> tuple[int, float] | None:
        """The model's default (steps, guidance scale), for jobs that leave them out."""
        identity = getattr(self.pipeline, "identity", None)
        return None if identity is None else (identity.default_steps, identity.default_guidance_scale)

    def announce(self) -> None:
        """Tell the API this worker serves its model; the background loop repeats it while ready."""
        info = self.model_info()
        if info is None:
            return
        with self._announce_lock:  # never after stop() withdrew it
            if self._stop.is_set():
                return
            models_registry.announce(self.services.redis, info, self.name)
            self._announced = True

    def withdraw(self) -> None:
        """Stop being counted as a worker of the model (on a clean stop; a killed one just expires)."""
        with self._announce_lock:
            if self._announced:
                self._announced = False
                models_registry.withdraw(self.services.redis, self.model_name, self.name)

    @property
    def max_batch(self) -> int:
        """``MEGASR_MAX_BATCH``, else 8 on a GPU and 1 on a CPU (where batching gains nothing)."""
        configured = self.services.settings.max_batch
        if configured is not None:
            return configured
        device = getattr(self.pipeline, "device", None)
        return 8 if device is not None and device.type == "cuda" else 1

    def prefetcher(self) -> InputPrefetcher | None:
        """The input prefetcher of this worker's queue, made on first use (``None`` when batches are
        single jobs: the next job is RQ's to pick, with nothing running beside it to hide a fetch)."""
        if self.max_batch <= 1:
            return None
        if self._prefetcher is None:
            self._prefetcher = InputPrefetcher(self.services, self.queue, capacity=2 * self.max_batch)
        return self._prefetcher

    def claimer(self) -> JobClaimer | None:
        """Who finds batch mates for a dequeued job (``None`` when batches are single jobs)."""
        if self.max_batch <= 1 or self.pipeline is None:
            return None
        return JobClaimer(
            self.services,
            self.pipeline.geometry,
            self.max_batch,
            self.services.settings.batch_wait_ms / 1000,
            queue=self.queue,
            defaults=self.sampling_defaults(),
        )

    def start_background(self, lease_interval_s: float = 5.0, reap_interval_s: float = 5.0) -> threading.Thread:
        """Renew the current job's lease, announce the model (once ready) and reap dead workers'
        jobs, until :meth:`stop`."""

        def loop() -> None:
            ticks = 0
            while not self._stop.wait(lease_interval_s):
                ticks += 1
                self.metrics.beat()  # worker.status_server's /healthz: 503 once these stop
                try:
                    for job_id, owner in list(self.running.items()):
                        self.services.jobs.renew_lease(job_id, owner)
                    if self.metrics.is_ready:
                        self.announce()
                    if ticks * lease_interval_s >= reap_interval_s:
                        ticks = 0
                        reap_abandoned(self.services)
                        delete_expired_results(self.services)
                except Exception as exc:  # Redis blips must not kill the thread
                    log.warning("lease/reaper loop: %s", exc)

        self.metrics.beat()
        thread = threading.Thread(target=loop, name="megasr-lease", daemon=True)
        thread.start()
        return thread

    def start_webhooks(self) -> None:
        """Deliver webhooks from this process too (its own threads, a bounded pool: never blocks a job)."""
        from service.webhooks import WebhookDispatcher

        settings = self.services.settings
        if settings.webhook_secret is None:
            return
        self._webhooks = WebhookDispatcher(
            self.services.redis,
            self.services.jobs,
            settings.webhook_secret.get_secret_value().encode(),
            public_url=settings.public_url,
            retry_base_s=settings.webhook_retry_base_s,
            timeout_s=settings.webhook_timeout_s,
            concurrency=settings.webhook_concurrency,
            allow_private=settings.webhook_allow_private,
            tenant_concurrency=settings.webhook_tenant_concurrency,
            circuit_failures=settings.webhook_circuit_failures,
            circuit_cooldown_s=settings.webhook_circuit_cooldown_s,
            max_pending_per_tenant=settings.webhook_max_pending_per_tenant,
        )
        self._webhooks.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.withdraw()
        except Exception as exc:  # Redis down: the announcement expires by itself
            log.warning("could not withdraw the model announcement: %s", exc)
        if getattr(self, "_webhooks", None) is not None:
            self._webhooks.stop()
        if self._prefetcher is not None:
            self._prefetcher.close()


def install_runtime(settings: Settings, pipeline: Any, services: Services | None = None) -> WorkerRuntime:
    global _RUNTIME
    _RUNTIME = WorkerRuntime(services=services or build_services(settings), pipeline=pipeline)
    return _RUNTIME


def get_runtime() -> WorkerRuntime:
    if _RUNTIME is None:
        raise RuntimeError("the worker runtime is not installed (start workers with `megasr worker`)")
    return _RUNTIME
