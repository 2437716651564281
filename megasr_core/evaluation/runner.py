"""One evaluation run, as ``megasr eval`` performs it: pair → (super-resolve) → check → score → report.

Everything that can be checked cheaply (folders, pairing, metric weight files) is checked before
any image is super-resolved, so a missing file fails in seconds rather than after hours.
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from PIL import Image

from megasr_core.weights.hub import resolve_weights_source

from ..progress import progress_bar
from .generate import Generated, bicubic, super_resolve, weights_identity
from .metric_weights import locate
from .models import ModelRun, column_labels, plan_models
from .pairing import Pairing, PairingError, Sample, attach_predictions, pair_dataset, pair_folders
from .paper import paper_figures
from .report import markdown_table, summarize
from .scoring import METRICS, PAPER_METRICS, build_metric, score


@dataclass
class EvalSettings:
    output: Path
    pred: Path | None = None
    gt: Path | None = None
    lr: Path | None = None
    dataset: str | None = None
    root: Path | None = None
    #: weights to super-resolve with, one report column each: folders or Hub ids (``megasr_core.weights.hub``)
    weights: list[str | Path] = field(default_factory=list)
    metrics: list[str] = field(default_factory=lambda: list(PAPER_METRICS))
    metric_weights: Path | None = None
    crop_border: int = 0
    baseline: str | None = None
    scale: float = 4.0
    steps: int | None = None  # None: each model's family default (a fast sampler's own)
    guidance_scale: float | None = None
    sampler: str = "ddpm"
    cfg_interval: tuple[float, float] | None = None
    seed: int = 0
    batch_size: int = 1
    metric_batch_size: int = 4
    device: str | None = None


def _pairing(settings: EvalSettings) -> Pairing:
    if settings.dataset is not None:
        _, pairing = pair_dataset(settings.dataset, settings.root)
        return attach_predictions(pairing, settings.pred) if settings.pred is not None else pairing
    if settings.pred is None and settings.lr is None:
        raise PairingError("give --pred DIR (outputs to score), --lr DIR with --weights, or --dataset NAME ROOT")
    return pair_folders(pred=settings.pred, gt=settings.gt, lr=settings.lr)


def _size_checked(samples: list[Sample], skipped: list[dict[str, str]]) -> list[Sample]:
    """Drop (and list) predictions whose size differs from their ground truth's."""
    kept: list[Sample] = []
    for sample in samples:
        try:
            sizes = [_size(path) for path in (sample.pred, sample.gt) if path is not None]
        except OSError as exc:  # PIL's UnidentifiedImageError included
            skipped.append({"file": str(sample.pred), "reason": f"unreadable image: {exc}"})
            continue
        if len(sizes) == 2 and sizes[0] != sizes[1]:
            (pw, ph), (gw, gh) = sizes
            skipped.append(
                {
                    "file": str(sample.pred),
                    "reason": f"size {pw}×{ph} differs from the ground truth's {gw}×{gh} ({sample.gt})",
                }
            )
            continue
        kept.append(sample)
    if not kept:
        raise PairingError("every pair was skipped (see the reasons above); nothing to score")
    return kept


def _common(per_model: list[list[Sample]], skipped: list[dict[str, str]]) -> list[list[Sample]]:
    """Every model's checked samples, kept only where all models have one, so the columns score the
    same images; an image dropped for one model is listed as skipped for the others."""
    checked = [_size_checked(samples, skipped) for samples in per_model]
    keys = set.intersection(*({s.key for s in samples} for samples in checked))
    for samples in checked:
        for sample in samples:
            if sample.key not in keys:
                skipped.append(
                    {
                        "file": str(sample.pred),
                        "reason": "another model's output for this image was skipped, so no column scores it",
                    }
                )
    if not keys:
        raise PairingError("no image has a usable output from every model; nothing to score")
    return [[s for s in samples if s.key in keys] for samples in checked]


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("megasr", "pyiqa", "torch", "torchvision", "timm"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def evaluate(settings: EvalSettings, log: Callable[[str], None] = lambda _: None) -> dict:
    """Run one evaluation, write ``eval.json`` and ``eval.md`` into ``settings.output``, return the report."""
    import torch

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pairing = _pairing(settings)
    samples = pairing.samples
    has_gt = all(s.gt is not None for s in samples)
    metrics = [m for m in settings.metrics if has_gt or not METRICS[m].full_reference]
    notes = []
    if len(metrics) < len(settings.metrics):
        notes.append(f"no ground truth: {', '.join(m for m in settings.metrics if m not in metrics)} not computed")
    if not metrics:
        raise PairingError("no ground truth, and only full-reference metrics were asked for")
    if settings.baseline not in (None, "bicubic"):
        raise PairingError(f"unknown --baseline {settings.baseline!r}; the one baseline is 'bicubic'")
    if settings.baseline is not None and any(s.lr is None for s in samples):
        raise PairingError(f"--baseline {settings.baseline} needs the LR images (--lr DIR or --dataset)")
    for name in metrics:
        locate(name, settings.metric_weights)  # fail now, not after super-resolving

    settings.output.mkdir(parents=True, exist_ok=True)
    generated: list[tuple[ModelRun, Generated]] = []
    if samples[0].pred is None:
        generated = _super_resolve_all(settings, samples, log)
        per_model = _common([g.samples for _, g in generated], pairing.skipped)
    else:
        per_model = [_size_checked(samples, pairing.skipped)]
    samples = per_model[0]

    with tempfile.TemporaryDirectory(prefix="megasr-eval-") as workdir, contextlib.redirect_stdout(sys.stderr):
        # (pyiqa prints its loading messages on stdout; the report's table is what belongs there)
        built = {
            name: build_metric(
                name,
                device=device,
                metric_weights=settings.metric_weights,
                workdir=Path(workdir),
                crop_border=settings.crop_border,
            )
            for name in metrics
        }

        def scored(items: list[Sample]) -> dict:
            with progress_bar(len(items), "scoring", "image") as bar:
                return summarize(
                    score(
                        [(s.key, s.pred, s.gt) for s in items],
                        built,
                        device=device,
                        batch_size=settings.metric_batch_size,
                        progress=bar.update,
                    )
                )

        log(f"scoring {len(samples)} images × {len(per_model)} model(s): {', '.join(metrics)} on {device}")
        columns = [scored(items) for items in per_model]
        baselines = {}
        if settings.baseline == "bicubic":
            baselines["bicubic"] = {
                "metrics": scored(bicubic(samples, settings.output / "bicubic", scale=settings.scale))
            }

    labels = column_labels([run for run, _ in generated], [result.identity for _, result in generated])
    models = [
        _model_entry(label, run, result, metrics_) for label, (run, result), metrics_ in zip(labels, generated, columns)
    ]
    report: dict = {
        "dataset": settings.dataset,
        # the first (or only) model's, as before several models could run: "models" has them all
        "weights": models[0]["weights"] if models else None,
        **({"resumed": models[0]["resumed"]} if models else {}),
        "metrics": columns[0],
        "models": models,
        "images": len(samples),
        "files": {
            s.key: {"pred": str(s.pred), "gt": str(s.gt) if s.gt else None, "lr": str(s.lr) if s.lr else None}
            for s in samples
        },
        "skipped": pairing.skipped,
        "baselines": baselines,
        "paper_table1": paper_figures(settings.dataset),
        "notes": notes,
        "versions": _versions(),
        "settings": {
            **{k: _jsonable(v) for k, v in asdict(settings).items()},
            "device": device,
            "psnr_ssim": "pyiqa psnr/ssim, test_y_channel=True, color_space='ycbcr' (BT.601 Y)",
        },
    }
    (settings.output / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (settings.output / "eval.md").write_text(markdown_table(report))
    return report


def _super_resolve_all(
    settings: EvalSettings, samples: list[Sample], log: Callable[[str], None]
) -> list[tuple[ModelRun, Generated]]:
    """Every ``--weights`` model's outputs, one model at a time (each is unloaded before the next)."""
    if not settings.weights:
        raise PairingError("nothing to score: give --pred DIR, or --weights DIR to super-resolve the LR images")
    folders = [resolve_weights_source(source) for source in settings.weights]  # Hub ids: downloaded now
    return [
        (
            run,
            super_resolve(
                samples,
                run.outputs,
                run.weights,
                scale=settings.scale,
                steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                seed=settings.seed,
                batch_size=settings.batch_size,
                device=settings.device,
                log=log,
                sampler=settings.sampler,
                cfg_interval=settings.cfg_interval,
            ),
        )
        for run in plan_models(folders, settings.output)
    ]


def _model_entry(label: str, run: ModelRun, result: Generated, metrics: dict) -> dict:
    """One model's block of the report: who it is, how it sampled, where its outputs are, its scores."""
    identity = result.identity
    return {
        "label": label,
        "family": identity["family"],
        "title": identity["title"],
        "weights_label": identity["weights"],
        "trained": identity["trained"],
        "untrained_reason": identity["untrained_reason"],
        "identity": identity,
        "weights": weights_identity(run.weights),
        "outputs": str(run.outputs),
        "resumed": result.resumed,
        "steps": result.steps,
        "guidance_scale": result.guidance_scale,
        "sampler": result.sampler,
        "cfg_interval": list(result.cfg_interval) if result.cfg_interval is not None else None,
        "metrics": metrics,
    }


def _jsonable(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
