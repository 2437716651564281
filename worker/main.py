"""``megasr worker``: load the pipeline once, warm up, then run jobs in this process (no fork).

CUDA and ``fork`` do not mix, and a forked child would reload the weights for every job, so
the worker is RQ's ``SimpleWorker``: jobs run in the process that holds the model. Readiness
(``/readyz`` on the metrics port, and the ``megasr_worker_ready`` gauge) turns on only after
the model is loaded and one warm-up image went through. SIGTERM is a warm shutdown: the current
job finishes, no new one is taken, then the process exits.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rq import Queue
from rq.worker import SimpleWorker

from service.config import Settings

from .runtime import WorkerRuntime, install_runtime

log = logging.getLogger("megasr.worker")


def load_pipeline(weights: Path, device: str | None = None, dtype=None):
    from megasr_core.pipelines import MegaSRPipeline

    return MegaSRPipeline.from_pretrained(weights, torch_dtype=dtype, device=device)


def warm_up(pipeline) -> None:
    """One small image through every stage (kernels, tag embeddings, allocator) before traffic."""
    from PIL import Image

    pipeline(Image.new("RGB", (32, 32), (128, 96, 64)), scale=4, num_inference_steps=1, seed=0)


class MegaSRWorker(SimpleWorker):
    """RQ's in-process worker with MegaSR's runtime (lease renewal, reaper) around it."""


def prepare(settings: Settings, weights: Path, device: str | None = None, dtype=None,
            metrics_port: int | None = None, metrics_host: str = "0.0.0.0") -> WorkerRuntime:
    runtime = install_runtime(settings, pipeline=None)
    if metrics_port is not None:
        runtime.metrics.serve(metrics_host, metrics_port)  # /healthz answers while loading
    log.info("loading MegaSR weights from %s", weights)
    runtime.pipeline = load_pipeline(weights, device=device, dtype=dtype)
    warm_up(runtime.pipeline)
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
