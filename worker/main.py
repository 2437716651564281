"""``megasr worker``: load the pipeline once, warm up, then run jobs in this process (no fork).

CUDA and ``fork`` do not mix, and a forked child would reload the weights for every job, so
the worker is RQ's ``SimpleWorker``: jobs run in the process that holds the model. Readiness
(``/readyz`` on the metrics port, and the ``megasr_worker_ready`` gauge) turns on only after
the model is loaded (and compiled, with ``MEGASR_COMPILE``) and every warm-up shape went
through: batch sizes 1 and ``MEGASR_MAX_BATCH`` at each size of ``MEGASR_WARMUP_BUCKETS``.
SIGTERM is a warm shutdown: the current batch finishes, no new job is taken, then the process
exits.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rq import Queue
from rq.worker import SimpleWorker

from service.config import Settings

from .runtime import WorkerRuntime, install_runtime

log = logging.getLogger("megasr.worker")


def load_pipeline(weights: Path, device: str | None = None, dtype=None):
    from megasr_core.pipelines import MegaSRPipeline

    return MegaSRPipeline.from_pretrained(weights, torch_dtype=dtype, device=device)


def warm_up(pipeline, sizes: list[tuple[int, int]], batch_sizes: list[int], scale: int = 4) -> None:
    """Run every (batch size, output size) shape once before traffic: kernels, tag embeddings,
    the allocator and, with compilation on, the compiled graphs of exactly those shapes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for height, width in sizes:
        lr = (max(1, width // scale), max(1, height // scale))
        for batch in batch_sizes:
            images = [Image.fromarray(rng.integers(0, 256, (lr[1], lr[0], 3), dtype=np.uint8)) for _ in range(batch)]
            # Two steps: the first runs eagerly, the second captures the step's CUDA graph (if on).
            pipeline(images, scale=scale, num_inference_steps=2, seed=0, max_batch_size=batch)


class MegaSRWorker(SimpleWorker):
    """RQ's in-process worker with MegaSR's runtime (lease renewal, reaper) around it."""


def prepare(settings: Settings, weights: Path, device: str | None = None, dtype=None,
            metrics_port: int | None = None, metrics_host: str = "0.0.0.0") -> WorkerRuntime:
    runtime = install_runtime(settings, pipeline=None)
    if metrics_port is not None:
        runtime.metrics.serve(metrics_host, metrics_port)  # /healthz answers while loading
    log.info("loading MegaSR weights from %s", weights)
    runtime.pipeline = load_pipeline(weights, device=device, dtype=dtype)
    if settings.compile:
        from megasr_core.pipelines.acceleration import compile_pipeline, use_compile_cache

        cache = use_compile_cache(settings.compile_cache or settings.home / "compile-cache")
        compile_pipeline(runtime.pipeline, scope=settings.compile)
        log.info("compiling (%s scope) during warm-up; cache in %s", settings.compile, cache)
    if settings.cuda_graphs is not False and runtime.pipeline.device.type == "cuda":
        from megasr_core.pipelines.acceleration import use_cuda_graphs

        use_cuda_graphs(runtime.pipeline)  # captured per shape during the warm-up below
        log.info("CUDA graphs on for the denoiser step")
    batch_sizes = sorted({1, runtime.max_batch})
    started = time.monotonic()
    warm_up(runtime.pipeline, settings.warmup_sizes() or [(512, 512)], batch_sizes)
    log.info("warmed up batch sizes %s at %s in %.1f s", batch_sizes, settings.warmup_buckets, time.monotonic() - started)
    runtime.metrics.mark_ready()
    runtime.start_background()
    runtime.start_webhooks()
    log.info("worker %s ready on queue %s", runtime.name, settings.queue_name)
    return runtime


def run_worker(runtime: WorkerRuntime, settings: Settings, burst: bool = False) -> None:
    connection = runtime.services.redis
    worker = MegaSRWorker([Queue(settings.queue_name, connection=connection)], connection=connection,
                          name=runtime.name)
    try:
        worker.work(burst=burst, logging_level="INFO", with_scheduler=False)
    finally:
        runtime.stop()
