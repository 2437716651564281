"""``megasr bench``: benchmarks on random weights (megasr_core.benchmarks); each prints one JSON object.

``megasr bench pipeline`` times one pipeline call per stage; ``megasr bench gpu`` runs the whole GPU suite
(baseline, batches, SeeSR and SeeSR-Turbo, compile, large) in one process, with its own options.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .common import fail, torch_dtype

app = typer.Typer(help="Benchmarks on random weights; each prints one JSON object.", no_args_is_help=True)

# The options both benchmarks take.
Size = Annotated[int, typer.Option(help="Output side in pixels (input = size / scale).")]
Scale = Annotated[int, typer.Option(help="Upscaling factor.")]
Steps = Annotated[int, typer.Option(help="Denoising steps.")]
Device = Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if available).")]
DType = Annotated[str | None, typer.Option(help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU).")]
GuidanceScale = Annotated[float, typer.Option(help="CFG scale (>1 runs the doubled batch).")]


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


@app.command("pipeline")
def bench_pipeline(
    preset: Annotated[str, typer.Option(help="tiny or sd2-base, random weights.")] = "tiny",
    size: Size = 512,
    scale: Scale = 4,
    steps: Steps = 50,
    batch: Annotated[int, typer.Option(help="Images per batch (>1 also times as many single-image runs).")] = 1,
    device: Device = None,
    dtype: DType = None,
    extractors: Annotated[bool, typer.Option(help="Include the guidance extractors.")] = True,
    guidance_scale: GuidanceScale = 5.5,
) -> None:
    """Time one pipeline call per stage on random weights; prints one JSON object."""
    from megasr_core.benchmarks.pipeline import run_pipeline_benchmark

    result = run_pipeline_benchmark(
        preset=preset,
        size=size,
        scale=scale,
        steps=steps,
        batch=batch,
        device=device,
        dtype=torch_dtype(dtype),
        with_extractors=extractors,
        guidance_scale=guidance_scale,
    )
    typer.echo(json.dumps(result, indent=2))


@app.command("gpu")
def bench_gpu(
    preset: Annotated[str, typer.Option(help="tiny or sd2-base, random weights.")] = "sd2-base",
    size: Size = 512,
    scale: Scale = 4,
    steps: Steps = 50,
    device: Device = None,
    dtype: DType = None,
    guidance_scale: GuidanceScale = 5.5,
    batches: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,4,8",
    scopes: Annotated[
        str,
        typer.Option(help="Compile scopes to time, in order (full, blocks, full+graphs, blocks+graphs; empty = none)."),
    ] = "full+graphs,blocks",
    sections: Annotated[
        str, typer.Option(help="Run only these sections, comma-separated (build always runs; default: all).")
    ] = "",
    large: Annotated[int, typer.Option(help="Output side of the tiled run (0 = skip).")] = 2048,
    budget_s: Annotated[float, typer.Option(help="Stop starting sections after this many seconds.")] = 420.0,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs at batch 1 (their median is reported).")] = 3,
    output: Annotated[
        Path | None, typer.Option(help="Also write the JSON here (rewritten after each section).")
    ] = None,
) -> None:
    """The whole GPU suite (baseline, batches, SeeSR and SeeSR-Turbo, compile, large) in one process."""
    from megasr_core.benchmarks.gpu_suite import run_gpu_suite

    try:
        batch_sizes = [int(b) for b in batches.split(",") if b.strip()]
    except ValueError:
        fail(f"--batches must be comma-separated integers, got {batches!r}")
    result = run_gpu_suite(
        preset=preset,
        size=size,
        scale=scale,
        steps=steps,
        guidance_scale=guidance_scale,
        batches=batch_sizes,
        scopes=_names(scopes),
        large=large or None,
        device=device,
        dtype=torch_dtype(dtype),
        budget_s=budget_s,
        output=output,
        single_repeats=repeats,
        sections=_names(sections) or None,
        log=lambda message: typer.echo(message, err=True),
    )
    typer.echo(json.dumps(result, indent=2))
