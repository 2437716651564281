"""``megasr worker``: load the pipeline once, warm up, then run jobs in this process (no fork).

CUDA and ``fork`` do not mix, and a forked child would reload the weights for every job, so
the worker is RQ's ``SimpleWorker``: jobs run in the process that holds the model. Readiness
(``/readyz`` on the metrics port, and the ``megasr_worker_ready`` gauge) turns on only after
the model is loaded (and compiled, with ``MEGASR_COMPILE``) and every warm-up shape went
through: batch sizes 1 and ``MEGASR_MAX_BATCH`` at each size of ``MEGASR_WARMUP_BUCKETS``.
SIGTERM is a warm shutdown: the current batch finishes, no new job is taken, then the process
exits. A fatal error (a broken CUDA context, ``worker.errors``) fails its job and stops the
worker with exit status :data:`EXIT_FATAL`, so that the orchestrator starts a fresh process
instead of leaving a "ready" worker that fails every job.

Jobs are dequeued tenant-fair and deserialized from JSON (``service.jobsystem.fair_queue``), never pickle.
A worker serves one model, ``MEGASR_MODEL`` (unset: ``default``), from that model's queue
(``Settings.queue_for``); once ready it announces it (``service.models_registry``), and it
warns at start when the weights are untrained.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, TypeVar

from redis import Redis
from rq.job import Job
from rq.worker import SimpleWorker

from service.config import Settings
from service.jobsystem.fair_queue import FairQueue
from service.jobsystem.queue import SERIALIZER

from .errors import FatalWorkerError, classify
from .runtime import WorkerRuntime, install_runtime

log = logging.getLogger("megasr.worker")


def load_pipeline(weights: Path, device: str | None = None, dtype=None, precision: str = "full"):
    from megasr_core.pipelines import MegaSRPipeline

    return MegaSRPipeline.from_pretrained(weights, torch_dtype=dtype, device=device, precision=precision)


def _random_lr(rng: Any, size: tuple[int, int], scale: int) -> Any:
    """A noise image whose ×``scale`` output is ``size`` (height, width): a warm-up input."""
    import numpy as np
    from PIL import Image

    height, width = max(1, size[0] // scale), max(1, size[1] // scale)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def warm_up(pipeline, sizes: list[tuple[int, int]], batch_sizes: list[int], scale: int = 4) -> None:
    """Run every (batch size, output size) shape once before traffic: kernels, tag embeddings,
    the allocator and, with compilation on, the compiled graphs of exactly those shapes."""
    import numpy as np

    rng = np.random.default_rng(0)
    for size in sizes:
        for batch in batch_sizes:
            images = [_random_lr(rng, size, scale) for _ in range(batch)]
            # Two steps: the first runs eagerly, the second captures the step's CUDA graph (if on).
            pipeline(images, scale=scale, num_inference_steps=2, seed=0, max_batch_size=batch)


def warm_up_large(runtime: WorkerRuntime, sizes: list[tuple[int, int]], scale: int = 4) -> None:
    """Warm the tiled sizes at batch 1 with as many tiles per model batch as the GPU holds: on an
    out-of-memory error the worker's tile batch cap steps down (``OOM_TILE_SIZES``) and the size is
    tried again, so jobs start with tile batches that fit."""
    import numpy as np
    import torch

    from .tasks import OOM_TILE_SIZES

    rng = np.random.default_rng(0)
    for height, width in sizes:
        image = _random_lr(rng, (height, width), scale)
        caps = [per_batch for size, per_batch in OOM_TILE_SIZES if size is None and per_batch <= runtime.tile_batch_cap]
        for cap in caps:
            try:
                runtime.pipeline([image], scale=scale, num_inference_steps=2, seed=0, tile_batch_size=cap)
                break
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                smaller = [c for c in caps if c < cap]
                if not smaller:
                    raise
                log.warning("warm-up %dx%d: %d tiles per batch do not fit; trying %d", height, width, cap, smaller[0])
                runtime.tile_batch_cap = smaller[0]


def warmup_batch_sizes(max_batch: int, buckets: tuple[int, ...] | None) -> list[int]:
    """The batch sizes a worker meets: 1 and ``max_batch``, or, where batches are padded to
    ``buckets``, every bucket up to the one ``max_batch`` jobs fill."""
    if not buckets:
        return sorted({1, max_batch})
    from megasr_core.pipelines.batching import padded_batch_size

    top = padded_batch_size(max_batch, buckets, None)
    return sorted({1, *(bucket for bucket in buckets if bucket <= top), top})


#: exit status of a worker stopped by a fatal error (EX_SOFTWARE): restart me
EXIT_FATAL = 70


class PromptUnsubscribe:
    """RQ workers listen for commands (``rq.command``) on a thread that reads its channel 60 s at a
    time, and a stopping worker joins that thread: whenever the unsubscribe reply came before the
    thread saw the stop, a worker hung for up to a minute after SIGTERM or at the end of a burst.
    Here each read lasts :attr:`pubsub_read_s`, so a stop takes at most that long."""

    pubsub_read_s: float = 1.0

    def subscribe(self) -> None:
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=self.pubsub_read_s, daemon=True, exception_handler=self._pubsub_exception_handler
        )


class StopOnFatal(PromptUnsubscribe, SimpleWorker):
    """An in-process RQ worker that stops after a job fails with a fatal error.

    RQ catches every exception of a job and goes on to the next one; after a broken CUDA context
    every next job would fail too. So the failure handling notes the fatal error, turns off
    RQ's retry of that job (its record is already failed) and asks the work loop to stop;
    ``fatal_error`` tells the caller to exit non-zero.
    """

    fatal_error: BaseException | None = None

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        exc = exc_info[1] if len(exc_info) > 1 else None
        if isinstance(exc, FatalWorkerError) or (isinstance(exc, Exception) and classify(exc) == "fatal"):
            self.fatal_error = exc
            self.log.critical(
                "worker %s: fatal error in job %s; stopping so that a fresh process takes over", self.name, job.id
            )
            job.retries_left = 0
            self._stop_requested = True
        super().handle_exception(job, *exc_info)


class MegaSRWorker(StopOnFatal):
    """RQ's in-process worker with MegaSR's runtime (lease renewal, reaper) around it."""


W = TypeVar("W", bound=SimpleWorker)


def make_worker(worker_class: type[W], connection: Redis, queue_name: str, name: str | None = None) -> W:
    """An RQ worker on one of MegaSR's queues (a model's: ``Settings.queue_for``): tenant-fair
    dequeue, JSON job data (never pickle), and a prompt stop (:class:`PromptUnsubscribe`, mixed
    into a plain RQ class given here)."""
    if not issubclass(worker_class, PromptUnsubscribe):
        worker_class = type(worker_class.__name__, (PromptUnsubscribe, worker_class), {})
    queue = FairQueue(queue_name, connection=connection, serializer=SERIALIZER)
    return worker_class([queue], connection=connection, name=name, queue_class=FairQueue, serializer=SERIALIZER)


def prepare(
    settings: Settings,
    weights: Path,
    device: str | None = None,
    dtype=None,
    metrics_port: int | None = None,
    metrics_host: str = "0.0.0.0",
) -> WorkerRuntime:
    runtime = install_runtime(settings, pipeline=None)
    runtime.metrics.model = {"name": runtime.model_name}
    if metrics_port is not None:
        runtime.metrics.serve(metrics_host, metrics_port)  # /healthz answers while loading
    log.info("loading weights for model %s from %s", runtime.model_name, weights)
    runtime.pipeline = load_pipeline(weights, device=device, dtype=dtype, precision=settings.precision)
    runtime.pipeline.max_output_pixels = settings.max_output_pixels  # the API's bound, enforced again here
    log_identity(runtime)
    if runtime.pipeline.device.type == "cuda":
        from megasr_core.pipelines.acceleration import use_fused_qkv

        # one GEMM for each self-attention's query, key and value (measured in the GPU suite)
        log.info("fused the QKV projections of %d self-attentions", use_fused_qkv(runtime.pipeline))
    if settings.compile:
        from megasr_core.pipelines.acceleration import compile_pipeline, use_compile_cache

        cache = use_compile_cache(settings.compile_cache or settings.home / "compile-cache")
        compile_pipeline(runtime.pipeline, scope=settings.compile, mode=settings.compile_mode)
        log.info(
            "compiling (%s scope, %s mode) during warm-up; cache in %s",
            settings.compile,
            settings.compile_mode or "default",
            cache,
        )
    if settings.cuda_graphs is not False and runtime.pipeline.device.type == "cuda":
        from megasr_core.pipelines.acceleration import use_cuda_graphs

        use_cuda_graphs(runtime.pipeline)  # captured per shape during the warm-up below
        log.info("CUDA graphs on for the denoiser step")
    batch_sizes = warmup_batch_sizes(runtime.max_batch, runtime.pipeline.batch_buckets)
    started = time.monotonic()
    warm_up(runtime.pipeline, settings.warmup_sizes() or [(512, 512)], batch_sizes)
    log.info(
        "warmed up batch sizes %s at %s in %.1f s", batch_sizes, settings.warmup_buckets, time.monotonic() - started
    )
    large = [size for size in settings.warmup_sizes(large=True) if size[0] * size[1] <= settings.max_output_pixels]
    if large and runtime.pipeline.device.type == "cuda":  # the tile shapes, captured or compiled before traffic
        started = time.monotonic()
        warm_up_large(runtime, large)
        log.info(
            "warmed up %s at batch 1, %d tiles per model batch, in %.1f s",
            settings.warmup_large,
            runtime.tile_batch_cap,
            time.monotonic() - started,
        )
    runtime.announce()  # GET /v1/models counts this worker from now on (renewed by the background loop)
    runtime.metrics.mark_ready()  # after the announcement: a ready worker is always a counted one
    runtime.start_background()
    runtime.start_webhooks()
    log.info("worker %s ready: model %s on queue %s", runtime.name, runtime.model_name, runtime.queue.name)
    return runtime


def log_identity(runtime: WorkerRuntime) -> None:
    """Say which model was loaded, and loudly when its weights are untrained (noise, not super-resolution)."""
    info = runtime.model_info()
    if info is None:
        return
    runtime.metrics.model = info.model_dump(mode="json")
    log.info(
        "model %s: %s (%s), weights %s, %s%s, %s",
        info.name,
        info.title,
        info.family,
        info.weights,
        info.dtype,
        " with fp8 linear layers" if info.precision == "fp8" else "",
        "trained" if info.trained else "UNTRAINED",
    )
    warning = runtime.pipeline.identity.warning()
    if warning is not None:
        log.warning("%s", warning)


def run_worker(runtime: WorkerRuntime, settings: Settings, burst: bool = False) -> None:
    """Take jobs until SIGTERM (or, with ``burst``, an empty queue); exit EXIT_FATAL after a fatal error."""
    worker = make_worker(MegaSRWorker, runtime.services.redis, runtime.queue.name, name=runtime.name)
    try:
        worker.work(burst=burst, logging_level="INFO", with_scheduler=False)
    finally:
        runtime.stop()
    if worker.fatal_error is not None:
        raise SystemExit(EXIT_FATAL)
