"""PSNR and SSIM on the Y channel written out from their definitions in numpy (float64), independently
of megasr_core: the references the quality-metric tests compare the library's numbers with.

Y = 16 + 65.481 R + 128.553 G + 24.966 B for RGB in [0, 1] (ITU-R BT.601, range 16-235); SSIM of
Wang et al. 2004 with an 11×11 Gaussian window (σ = 1.5), 'valid' windows and the
contrast-structure term clamped at 0, as pyiqa computes it.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def y_bt601(rgb: np.ndarray) -> np.ndarray:
    """H×W×3 RGB in [0, 1] → Y in [16, 235]."""
    return 16.0 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]


def y_levels(rgb: np.ndarray) -> np.ndarray:
    """BT.601 Y rounded to whole levels, what SSIM sees."""
    return np.round(y_bt601(rgb))


def grey_mean(rgb: np.ndarray) -> np.ndarray:
    """The wrong luma: plain mean of the channels on the 0-255 scale (used to show the tests have teeth)."""
    return rgb.mean(axis=-1) * 255.0


def psnr_ref(x: np.ndarray, y: np.ndarray) -> float:
    mse = np.mean((x - y) ** 2)
    return 10.0 * math.log10(255.0**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(ax**2) / (2.0 * sigma**2))
    w = np.outer(g, g)
    return w / w.sum()


def filter_valid(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """'valid' 2-D filtering: every full window position, weighted sum."""
    patches = sliding_window_view(image, window.shape)
    return np.einsum("ijkl,kl->ij", patches, window)


def ssim_ref(x: np.ndarray, y: np.ndarray, c1: float = (0.01 * 255) ** 2, c2: float = (0.03 * 255) ** 2) -> float:
    w = gaussian_window()
    mu_x, mu_y = filter_valid(x, w), filter_valid(y, w)
    var_x = filter_valid(x * x, w) - mu_x**2
    var_y = filter_valid(y * y, w) - mu_y**2
    cov = filter_valid(x * y, w) - mu_x * mu_y
    contrast_structure = np.maximum((2 * cov + c2) / (var_x + var_y + c2), 0.0)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * contrast_structure
    return float(ssim_map.mean())
