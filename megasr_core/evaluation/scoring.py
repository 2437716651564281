"""The paper's metrics through pyiqa, built from local weight files and run batched.

PSNR and SSIM are pyiqa's ``psnr``/``ssim`` on the Y channel of **YCbCr** (``test_y_channel=True,
color_space='ycbcr'``), as SR papers compute them; pyiqa's ``psnry`` uses YIQ luma instead and
reads about 1.3 dB lower. The other metrics use pyiqa's default configuration of the same name
(LPIPS: AlexNet v0.1; MUSIQ and MANIQA: KonIQ-10k; CLIPIQA: RN50; NIQE: the MATLAB model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .metric_weights import locate, niqe_parameters_mat, torch_hub_with


@dataclass(frozen=True)
class MetricSpec:
    label: str  # as Table 1 prints it
    full_reference: bool
    lower_better: bool


METRICS: dict[str, MetricSpec] = {
    "psnr": MetricSpec("PSNR", True, False),
    "ssim": MetricSpec("SSIM", True, False),
    "lpips": MetricSpec("LPIPS", True, True),
    "dists": MetricSpec("DISTS", True, True),
    "niqe": MetricSpec("NIQE", False, True),
    "maniqa": MetricSpec("MANIQA", False, False),
    "musiq": MetricSpec("MUSIQ", False, False),
    "clipiqa": MetricSpec("CLIPIQA", False, False),
}
PAPER_METRICS = ("psnr", "ssim", "lpips", "niqe", "maniqa", "musiq", "clipiqa")  # Table 1's seven, in its order


def parse_metrics(text: str) -> list[str]:
    """``"psnr,ssim"`` → ``["psnr", "ssim"]``; unknown names are a ValueError listing the known ones."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose among {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def _maniqa_backbone_without_download() -> Iterator[None]:
    """MANIQA builds its ViT-B/8 with ``timm.create_model(..., pretrained=True)`` (a Hugging Face
    download), then overwrites every ViT weight from the MANIQA checkpoint (strict load). Building the
    ViT unpretrained gives the same network without the download."""
    from unittest import mock

    from pyiqa.archs import maniqa_arch

    create = maniqa_arch.timm.create_model

    def create_unpretrained(*args, **kwargs):
        return create(*args, **{**kwargs, "pretrained": False})

    with mock.patch.object(maniqa_arch.timm, "create_model", create_unpretrained):
        yield


def build_metric(
    name: str,
    *,
    device: torch.device | str,
    metric_weights: Path | None,
    workdir: Path,
    crop_border: int = 0,
    **options,
) -> torch.nn.Module:
    """One pyiqa metric on ``device`` with its weights from local files (MetricWeightsError if missing).

    ``workdir`` receives generated files (NIQE's .mat); ``options`` go to pyiqa's architecture
    (tests use them to keep networks small and fast, e.g. MANIQA's ``test_sample``).
    """
    import pyiqa

    files = locate(name, metric_weights)
    path = {f: str(p) for f, p in files.items()}
    if name in ("psnr", "ssim"):
        return pyiqa.create_metric(
            name, device=device, test_y_channel=True, color_space="ycbcr", crop_border=crop_border, **options
        )
    if name == "niqe":
        return pyiqa.create_metric(
            "niqe", device=device, pretrained_model_path=str(niqe_parameters_mat(workdir)), **options
        )
    if name in ("lpips", "dists"):
        model_file, backbone_file = files  # the pyiqa checkpoint, then torchvision's ImageNet backbone
        with torch_hub_with({backbone_file: files[backbone_file]}):
            return pyiqa.create_metric(name, device=device, pretrained_model_path=path[model_file], **options)
    if name == "musiq":
        (model_file,) = files
        return pyiqa.create_metric("musiq", device=device, pretrained_model_path=path[model_file], **options)
    if name == "maniqa":
        from pyiqa.archs.arch_util import load_pretrained_network

        (model_file,) = files
        with _maniqa_backbone_without_download():
            metric = pyiqa.create_metric("maniqa", device=device, pretrained=False, **options)
        load_pretrained_network(metric.net, path[model_file], True)  # what pyiqa does with its download
        return metric
    if name == "clipiqa":
        (model_file,) = files
        return pyiqa.create_metric("clipiqa", device=device, backbone=path[model_file], **options)
    raise ValueError(f"unknown metric {name!r}")


def load_rgb(path: Path) -> torch.Tensor:
    """An image file → ``3×H×W`` float RGB in [0, 1] (alpha dropped, palette and grey expanded)."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def batches(
    items: list[tuple[str, Path, Path | None]], batch_size: int
) -> Iterator[list[tuple[str, Path, Path | None]]]:
    """Consecutive runs of same-size images, at most ``batch_size`` long (pyiqa stacks a batch)."""
    run: list[tuple[str, Path, Path | None]] = []
    size = None
    for item in items:
        with Image.open(item[1]) as image:
            item_size = image.size
        if run and (item_size != size or len(run) == batch_size):
            yield run
            run = []
        run.append(item)
        size = item_size
    if run:
        yield run


def score(
    items: Iterable[tuple[str, Path, Path | None]],
    metrics: dict[str, torch.nn.Module],
    *,
    device: torch.device | str,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """``{metric: {key: value}}`` for ``(key, prediction, ground truth or None)`` items.

    Full-reference metrics need every item's ground truth; each batch is read once for all metrics.
    """
    results: dict[str, dict[str, float]] = {name: {} for name in metrics}
    with torch.inference_mode():
        for run in batches(list(items), batch_size):
            pred = torch.stack([load_rgb(p) for _, p, _ in run]).to(device)
            gt = (
                torch.stack([load_rgb(g) for _, _, g in run]).to(device)
                if all(g is not None for _, _, g in run)
                else None
            )
            for name, metric in metrics.items():
                values = metric(pred, gt) if METRICS[name].full_reference else metric(pred)
                for (key, _, _), value in zip(run, values.reshape(len(run), -1)[:, 0].tolist()):
                    results[name][key] = float(value)
            if progress is not None:
                progress(len(run))
    return results
