"""Full-reference quality metrics as the paper reports them: PSNR and SSIM on the Y channel.

Y is ITU-R BT.601 luma of 8-bit RGB (16-235 range), as in the SR literature (and pyiqa's
``test_y_channel`` with ``color_space='ycbcr'``); SSIM uses an 11×11 Gaussian window with σ = 1.5.
As in pyiqa (whose numbers the paper reports) and MATLAB's ``rgb2ycbcr`` on 8-bit images, SSIM
sees Y rounded to whole levels and a contrast-structure term clamped at 0; PSNR sees unrounded Y.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rgb_to_y(images: torch.Tensor) -> torch.Tensor:
    """``B×3×H×W`` RGB in [0, 1] → ``B×1×H×W`` Y in [0, 255] (16-235)."""
    r, g, b = images[:, 0:1] * 255.0, images[:, 1:2] * 255.0, images[:, 2:3] * 255.0
    return 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0


def psnr_y(prediction: torch.Tensor, target: torch.Tensor, crop: int = 0) -> torch.Tensor:
    """Per-image PSNR (dB) on Y; ``crop`` border pixels are ignored."""
    y_pred, y_true = rgb_to_y(prediction.float()), rgb_to_y(target.float())
    if crop:
        y_pred, y_true = y_pred[..., crop:-crop, crop:-crop], y_true[..., crop:-crop, crop:-crop]
    mse = (y_pred - y_true).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    axis = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(axis**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()[None, None]


def ssim_y(prediction: torch.Tensor, target: torch.Tensor, crop: int = 0) -> torch.Tensor:
    """Per-image SSIM on Y rounded to whole levels (valid-window mean, constants of Wang et al. 2004)."""
    x, y = rgb_to_y(prediction.float()).double().round(), rgb_to_y(target.float()).double().round()
    if crop:
        x, y = x[..., crop:-crop, crop:-crop], y[..., crop:-crop, crop:-crop]
    window = _gaussian_window().to(x)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    sigma_x = F.conv2d(x * x, window) - mu_x**2
    sigma_y = F.conv2d(y * y, window) - mu_y**2
    sigma_xy = F.conv2d(x * y, window) - mu_x * mu_y
    contrast_structure = ((2 * sigma_xy + c2) / (sigma_x + sigma_y + c2)).clamp_min(0)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * contrast_structure
    return ssim_map.mean(dim=(1, 2, 3)).float()
