"""Unsharp masking of HR training targets, as basicsr's ``USMSharp`` does it (Real-ESRGAN ``use_usm``).

SeeSR makes its training pairs from USM-sharpened ground truth: the LR is degraded from the
sharpened HR and the model learns to produce it, which pushes outputs towards crisper detail.
The mask keeps flat regions untouched: only pixels whose high-pass residual exceeds
``threshold`` (in 0-255 levels) are sharpened, with a blurred (soft) mask so the transition
does not show.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .degradations import filter2d


@dataclass(frozen=True)
class USMConfig:
    """basicsr's defaults: a 51×51 Gaussian (``radius`` 50 made odd, σ from OpenCV's rule), weight 0.5, threshold 10."""

    radius: int = 50
    sigma: float = 0.0  # 0 = OpenCV's default for the size: 0.3·((size − 1)/2 − 1) + 0.8
    weight: float = 0.5
    threshold: float = 10.0


def gaussian_kernel_1d(size: int, sigma: float = 0.0) -> torch.Tensor:
    """OpenCV's ``getGaussianKernel``: normalized exp(−x²/2σ²) on ``size`` taps centred on 0."""
    if sigma <= 0:
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def usm_kernel(config: USMConfig = USMConfig()) -> torch.Tensor:
    """The separable 2-D blur of the USM: outer product of the 1-D Gaussian (odd side)."""
    size = config.radius + 1 if config.radius % 2 == 0 else config.radius
    line = gaussian_kernel_1d(size, config.sigma)
    return torch.outer(line, line).float()


def usm_sharpen(images: torch.Tensor, config: USMConfig = USMConfig()) -> torch.Tensor:
    """Sharpen ``B×3×H×W`` in [0, 1]: soft_mask·clip(x + w·(x − blur(x))) + (1 − soft_mask)·x."""
    kernel = usm_kernel(config).expand(images.shape[0], -1, -1)
    blur = filter2d(images, kernel)
    residual = images - blur
    mask = (residual.abs() * 255 > config.threshold).to(images.dtype)
    soft_mask = filter2d(mask, kernel)
    sharp = (images + config.weight * residual).clamp(0, 1)
    return soft_mask * sharp + (1 - soft_mask) * images
