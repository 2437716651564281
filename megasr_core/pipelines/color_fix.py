"""Colour correction of the SR output towards the bicubic-upscaled LR (SeeSR/StableSR).

Diffusion SR drifts in colour; both fixes keep the model's detail and take the colour from
the LR: AdaIN matches each channel's mean and standard deviation; the wavelet fix keeps the
output's high frequencies and the LR's low frequencies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..parameters import COLOR_FIX_METHODS as METHODS


def adain(content: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per image and channel: (content − μ_c) / σ_c · σ_ref + μ_ref."""
    c_mean = content.mean(dim=(-2, -1), keepdim=True)
    c_std = content.std(dim=(-2, -1), keepdim=True, unbiased=False)
    r_mean = reference.mean(dim=(-2, -1), keepdim=True)
    r_std = reference.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (content - c_mean) / (c_std + eps) * r_std + r_mean


def _blur(image: torch.Tensor, dilation: int) -> torch.Tensor:
    kernel = image.new_tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0
    kernel = kernel.expand(image.shape[1], 1, 3, 3)
    padded = F.pad(image, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=image.shape[1], dilation=dilation)


def low_frequencies(image: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """The residual after ``levels`` passes of a dilated 3×3 blur (à trous wavelet)."""
    low = image
    for level in range(levels):
        low = _blur(low, 2**level)
    return low


def wavelet(content: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """High frequencies of ``content`` + low frequencies of ``reference``."""
    return content - low_frequencies(content, levels) + low_frequencies(reference, levels)


def color_fix(content: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    """Apply ``method`` ("adain", "wavelet" or "none") to B×3×H×W images in [0, 1]."""
    if method == "none":
        return content
    if method == "adain":
        fixed = adain(content.float(), reference.float())
    elif method == "wavelet":
        fixed = wavelet(content.float(), reference.float())
    else:
        raise ValueError(f"color_fix must be one of {', '.join(METHODS)}, got {method!r}")
    return fixed.clamp(0, 1).to(content.dtype)
