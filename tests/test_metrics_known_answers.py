"""Known answers for PSNR/SSIM on the Y channel (megasr_core.image_quality), recomputed in numpy.

The references (tests/quality_references.py) are written out from the definitions, independently of the code under test:
Y = 16 + 65.481 R + 128.553 G + 24.966 B for RGB in [0, 1] (ITU-R BT.601, range 16-235), and
SSIM of Wang et al. 2004: 11×11 Gaussian window (σ = 1.5), 'valid' windows, C1 = (0.01·255)²,
C2 = (0.03·255)², mean of the SSIM map; as pyiqa (and MATLAB on 8-bit images) compute it, SSIM sees
Y rounded to whole levels and the contrast-structure term clamped at 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data

from megasr_core.image_quality import psnr_y, ssim_y
from tests.quality_references import grey_mean, psnr_ref, ssim_ref, y_bt601, y_levels


def as_batch(*images: np.ndarray) -> torch.Tensor:
    """H×W×3 float arrays → B×3×H×W float32 tensor."""
    return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).astype(np.float32))


def f32(image: np.ndarray) -> np.ndarray:
    """The exact values the code under test sees (its inputs are float32)."""
    return image.astype(np.float32).astype(np.float64)


# ---------------------------------------------------------------- real photos
@pytest.fixture(scope="module")
def astronaut_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    """Two 80×96 astronaut crops and noisy versions (independent noise per channel, clipped)."""
    rng = np.random.default_rng(0)
    photo = data.astronaut().astype(np.float64) / 255.0
    pairs = []
    for (top, left), sigma in (((100, 150), 0.04), ((300, 260), 0.09)):
        clean = f32(photo[top : top + 80, left : left + 96])
        noisy = f32(np.clip(clean + rng.normal(0.0, sigma, clean.shape), 0.0, 1.0))
        pairs.append((noisy, clean))
    return pairs


@pytest.mark.parametrize("crop", [0, 4])
def test_psnr_y_matches_bt601_reference_on_noisy_photos(astronaut_pairs, crop):
    """PSNR = 10·log10(255² / MSE) on BT.601 Y, per image, with ``crop`` border pixels dropped."""
    pred = as_batch(*[p for p, _ in astronaut_pairs])
    true = as_batch(*[t for _, t in astronaut_pairs])
    got = psnr_y(pred, true, crop=crop).double().numpy()
    s = slice(crop, -crop) if crop else slice(None)
    expected = [psnr_ref(y_bt601(p)[s, s], y_bt601(t)[s, s]) for p, t in astronaut_pairs]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)
    assert expected[0] > expected[1] + 3  # the stronger noise really scores lower


def test_ssim_y_matches_wang_2004_reference_on_noisy_photos(astronaut_pairs):
    """SSIM (Gaussian 11×11, σ 1.5, C1=(0.01·255)², C2=(0.03·255)², valid mean) on BT.601 Y levels."""
    pred = as_batch(*[p for p, _ in astronaut_pairs])
    true = as_batch(*[t for _, t in astronaut_pairs])
    got = ssim_y(pred, true).double().numpy()
    expected = [ssim_ref(y_levels(p), y_levels(t)) for p, t in astronaut_pairs]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    # Teeth: constants ×10 or ×100 move the reference far beyond the tolerance.
    for (p, t), value in zip(astronaut_pairs, expected):
        assert (
            abs(ssim_ref(y_levels(p), y_levels(t), c1=10 * (0.01 * 255) ** 2, c2=10 * (0.03 * 255) ** 2) - value) > 1e-3
        )


def test_ssim_y_crop_drops_exactly_the_border(astronaut_pairs):
    """``crop=c`` scores the image without c pixels on every side: the reference on the cropped Y."""
    crop = 6
    pred = as_batch(*[p for p, _ in astronaut_pairs])
    true = as_batch(*[t for _, t in astronaut_pairs])
    got = ssim_y(pred, true, crop=crop).double().numpy()
    inner = (slice(crop, -crop), slice(crop, -crop))
    expected = [ssim_ref(y_levels(p)[inner], y_levels(t)[inner]) for p, t in astronaut_pairs]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert np.abs(got - ssim_y(pred, true).double().numpy()).max() > 1e-4  # the border really matters here


def test_y_channel_is_bt601_luma_not_plain_grey():
    """On a colour photo distorted in one channel only, PSNR/SSIM follow the BT.601 weights of Y."""
    rng = np.random.default_rng(1)
    cat = data.chelsea().astype(np.float64)[60:140, 150:246] / 255.0
    clean = f32(cat)
    distorted = clean.copy()
    distorted[..., 2] = np.clip(distorted[..., 2] + rng.normal(0, 0.15, distorted.shape[:2]), 0, 1)  # blue only
    distorted = f32(distorted)
    got_psnr = float(psnr_y(as_batch(distorted), as_batch(clean))[0])
    got_ssim = float(ssim_y(as_batch(distorted), as_batch(clean))[0])
    want_psnr = psnr_ref(y_bt601(distorted), y_bt601(clean))
    want_ssim = ssim_ref(y_levels(distorted), y_levels(clean))
    assert got_psnr == pytest.approx(want_psnr, abs=1e-3)
    assert got_ssim == pytest.approx(want_ssim, abs=1e-4)
    # Teeth: plain grey weighs blue 1/3 instead of 24.966/219 ≈ 0.11, a different answer.
    assert abs(psnr_ref(grey_mean(distorted), grey_mean(clean)) - want_psnr) > 1.0
    assert abs(ssim_ref(grey_mean(distorted), grey_mean(clean)) - want_ssim) > 1e-3


@pytest.mark.parametrize("channel, weight", [(0, 65.481), (1, 128.553), (2, 24.966)])
def test_psnr_of_a_constant_offset_in_one_channel_is_analytic(channel, weight):
    """Offset δ in one channel ⇒ Y offset = w·δ ⇒ PSNR = 20·log10(255 / (w·δ)), whatever the image."""
    delta = 0.02
    photo = data.coffee().astype(np.float64)[100:164, 200:280] / 255.0
    clean = 0.1 + 0.8 * photo  # headroom: no clipping after the offset
    shifted = clean.copy()
    shifted[..., channel] += delta
    got = float(psnr_y(as_batch(shifted), as_batch(clean))[0])
    assert got == pytest.approx(20 * math.log10(255.0 / (weight * delta)), abs=1e-3)


def test_ssim_of_two_flat_images_is_analytic():
    """Flat images (σ = 0): SSIM = (2ab + C1)/(a² + b² + C1) with a, b their BT.601 Y levels (whole numbers)."""
    dark, lighter = 0.0, 0.1
    x = np.full((32, 40, 3), dark)
    y = np.full((32, 40, 3), lighter)
    a, b = round(16.0 + 219.0 * dark), round(16.0 + 219.0 * lighter)  # 16 and 37.9 → 38
    c1 = (0.01 * 255) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = float(ssim_y(as_batch(x), as_batch(y))[0])
    assert got == pytest.approx(expected, abs=1e-6)
    assert float(ssim_y(as_batch(x), as_batch(x))[0]) == pytest.approx(1.0, abs=1e-9)
