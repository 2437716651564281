"""``megasr eval``: score super-resolved images with the paper's metrics (megasr_core.evaluation, pyiqa)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import fail, quiet_loading
from .option_checks import check_sampling, parse_cfg_interval

DEFAULT_METRICS = ",".join(("psnr", "ssim", "lpips", "niqe", "maniqa", "musiq", "clipiqa"))


def eval_command(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Report folder: eval.json, eval.md, sr/ (outputs), bicubic/.")
    ],
    pred: Annotated[
        Path | None, typer.Option(help="Folder of outputs to score (paired with --gt by file stem).")
    ] = None,
    gt: Annotated[Path | None, typer.Option(help="Folder of ground-truth HR images.")] = None,
    lr: Annotated[
        Path | None, typer.Option(help="Folder of LR images (super-resolved with --weights; bicubic baseline).")
    ] = None,
    dataset: Annotated[
        tuple[str, Path] | None,
        typer.Option(help="A test set and its folder: realsr|drealsr|div2k-val|dped-iphone ROOT."),
    ] = None,
    weights: Annotated[
        list[str] | None,
        typer.Option(
            help="Weights of any family (a folder, hf://org/name[@revision]): super-resolve the LR images first. "
            "Repeat to compare models side by side (one column and one OUTPUT/sr/<label>/ each; one model "
            "writes OUTPUT/sr/). Outputs already there are kept."
        ),
    ] = None,
    metrics: Annotated[
        str, typer.Option(help="Comma-separated: psnr, ssim, lpips, dists, niqe, maniqa, musiq, clipiqa.")
    ] = DEFAULT_METRICS,
    metric_weights: Annotated[
        Path | None,
        typer.Option(
            help="Folder of the metrics' weight files (else pyiqa's and torch hub's caches); never downloaded."
        ),
    ] = None,
    crop_border: Annotated[int, typer.Option(help="PSNR/SSIM ignore this many border pixels.")] = 0,
    baseline: Annotated[str | None, typer.Option(help="'bicubic': add a bicubic-upscale row.")] = None,
    scale: Annotated[float, typer.Option(help="Upscaling factor (super-resolution and the bicubic baseline).")] = 4.0,
    steps: Annotated[
        int | None,
        typer.Option(
            help="Denoising steps (default: each model's family default: MegaSR and SeeSR 50, SeeSR-Turbo 2)."
        ),
    ] = None,
    guidance_scale: Annotated[
        float | None,
        typer.Option(help="Classifier-free guidance scale (default: the family's: 5.5, SeeSR-Turbo 1 = none)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of every image's generator.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per super-resolution batch.")] = 1,
    metric_batch_size: Annotated[int, typer.Option(help="Images per metric batch (same-size images only).")] = 4,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")] = None,
    sampler: Annotated[
        str, typer.Option(help="ddpm (the paper's), dpmpp-2m or unipc; use a separate --output per sampler.")
    ] = "ddpm",
    cfg_interval: Annotated[
        str | None, typer.Option(help="Guidance only on this part of the schedule: start,end fractions.")
    ] = None,
) -> None:
    """Score super-resolved images with the paper's metrics (pyiqa); writes JSON and a Table-1 Markdown table."""
    try:
        import pyiqa  # noqa: F401
    except ImportError:
        fail("megasr eval needs the [eval] extra: pip install -c constraints/eval.txt -e '.[eval]'")
    from megasr_core.evaluation import EvalSettings, MetricWeightsError, PairingError, evaluate, parse_metrics

    check_sampling(sampler=sampler)
    interval = parse_cfg_interval(cfg_interval)
    quiet_loading()

    if batch_size < 1 or metric_batch_size < 1 or crop_border < 0:
        fail("--batch-size and --metric-batch-size must be at least 1, --crop-border at least 0")
    try:
        settings = EvalSettings(
            output=output,
            pred=pred,
            gt=gt,
            lr=lr,
            dataset=dataset[0].lower() if dataset else None,
            root=dataset[1] if dataset else None,
            weights=list(weights or []),
            metrics=parse_metrics(metrics),
            metric_weights=metric_weights,
            crop_border=crop_border,
            baseline=baseline,
            scale=scale,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            batch_size=batch_size,
            metric_batch_size=metric_batch_size,
            device=device,
            sampler=sampler,
            cfg_interval=interval,
        )
        report = evaluate(settings, log=lambda message: typer.echo(message, err=True))
    except (PairingError, MetricWeightsError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    for skip in report["skipped"]:
        typer.secho(f"skipped {skip['file']}: {skip['reason']}", fg=typer.colors.YELLOW, err=True)
    typer.echo((output / "eval.md").read_text())
    typer.echo(f"wrote {output / 'eval.json'} and {output / 'eval.md'}")
