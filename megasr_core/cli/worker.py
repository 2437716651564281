"""``megasr worker``: a GPU worker that loads the model once and takes upscale jobs from Redis.

``service`` and ``worker`` (the [serve] extra) are imported inside the command, never at module level.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .common import SERVE_MODULES, fail, observe, require, resolve_weights, settings_or_fail
from .option_checks import check_device, check_dtype, check_precision


def worker(
    weights: Annotated[
        str | None,
        typer.Option(
            help="MegaSR weights: a folder, hf://org/name or hf://org/name@revision (default: $MEGASR_WEIGHTS)."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")] = None,
    dtype: Annotated[str | None, typer.Option(help="fp32, fp16 or bf16 (default: fp16 on CUDA).")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve /metrics, /healthz, /readyz on this port.")] = None,
    burst: Annotated[bool, typer.Option("--burst", help="Exit when the queue is empty.")] = False,
    compile: Annotated[
        str | None,
        typer.Option("--compile", help="torch.compile scope: blocks or full (default: $MEGASR_COMPILE, else eager)."),
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(help="Jobs per GPU batch (default: $MEGASR_MAX_BATCH, else 8 on CUDA, 1 on CPU).")
    ] = None,
    cuda_graphs: Annotated[
        bool | None,
        typer.Option(
            "--cuda-graphs/--no-cuda-graphs",
            help="Replay the denoiser step from CUDA graphs (default: $MEGASR_CUDA_GRAPHS, else on with CUDA).",
        ),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(help="full, or fp8: float8 linear layers, GPUs of compute capability 8.9+ ($MEGASR_PRECISION)."),
    ] = None,
) -> None:
    """Run a GPU worker: load the model once, then process upscale jobs from Redis, batched."""
    require("serve", *SERVE_MODULES)
    from worker.main import prepare, run_worker

    device = check_device(device)
    torch_dtype = check_dtype(dtype, device)
    if precision is not None:
        check_precision(precision, device)
    options = (("compile", compile), ("max_batch", max_batch), ("cuda_graphs", cuda_graphs), ("precision", precision))
    settings = settings_or_fail(**{k: v for k, v in options if v is not None})
    check_precision(settings.precision, device, flag="MEGASR_PRECISION")
    observe(settings, "megasr-worker")
    if not settings.redis_url:
        fail("MEGASR_REDIS_URL is not set: workers need the Redis the API uses")
    weights_dir = resolve_weights(weights or settings.weights)
    runtime = prepare(settings, weights_dir, device=device, dtype=torch_dtype, metrics_port=metrics_port)
    run_worker(runtime, settings, burst=burst)
