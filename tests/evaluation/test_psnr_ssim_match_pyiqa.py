"""Our hand-written PSNR/SSIM on Y (megasr_core.image_quality) equal pyiqa's ycbcr-Y metrics on real photos."""

from __future__ import annotations

import pytest

pyiqa = pytest.importorskip("pyiqa", reason="the [eval] extra")

import numpy as np
import torch

from megasr_core.image_quality import psnr_y, ssim_y
from tests.evaluation.helpers import blurred, jpeg, noisy

DEGRADATIONS = {
    "blur": lambda im: blurred(im, 1.5),
    "noise": lambda im: noisy(im, 12.0, seed=1),
    "jpeg": lambda im: jpeg(im, 15),
    "strong noise": lambda im: noisy(im, 60.0, seed=2),  # low enough that some contrast terms go negative
}


def as_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def pairs(photos):
    """Every photo under every degradation, as (degraded, clean) 1×3×H×W tensors."""
    return {
        f"{name}/{kind}": (as_tensor(make(photo)), as_tensor(photo))
        for name, photo in photos.items()
        for kind, make in DEGRADATIONS.items()
    }


@pytest.mark.parametrize("crop", [0, 4])
def test_psnr_equals_pyiqa_ycbcr_y(pairs, crop):
    metric = pyiqa.create_metric("psnr", test_y_channel=True, color_space="ycbcr", crop_border=crop, device="cpu")
    for label, (pred, gt) in pairs.items():
        ours, theirs = float(psnr_y(pred, gt, crop=crop)[0]), float(metric(pred, gt))
        assert ours == pytest.approx(theirs, abs=1e-3), label


@pytest.mark.parametrize("crop", [0, 4])
def test_ssim_equals_pyiqa_ycbcr_y(pairs, crop):
    metric = pyiqa.create_metric("ssim", test_y_channel=True, color_space="ycbcr", crop_border=crop, device="cpu")
    for label, (pred, gt) in pairs.items():
        ours, theirs = float(ssim_y(pred, gt, crop=crop)[0]), float(metric(pred, gt))
        assert ours == pytest.approx(theirs, abs=1e-4), label


def test_batched_values_equal_single_ones(pairs):
    """A batch scores each image as if alone (the evaluation batches same-size images)."""
    preds = torch.cat([p for p, _ in pairs.values()])
    gts = torch.cat([g for _, g in pairs.values()])
    metric = pyiqa.create_metric("ssim", test_y_channel=True, color_space="ycbcr", device="cpu")
    np.testing.assert_allclose(metric(preds, gts).numpy().ravel(), ssim_y(preds, gts).numpy(), atol=1e-4)


def test_pyiqa_psnry_is_yiq_and_reads_lower(pairs):
    """Why we pass color_space='ycbcr': pyiqa's `psnry` (YIQ luma) is a different, lower number."""
    psnry = pyiqa.create_metric("psnry", device="cpu")
    gaps = [float(psnr_y(p, g)[0]) - float(psnry(p, g)) for p, g in pairs.values()]
    assert min(gaps) > 0.5
