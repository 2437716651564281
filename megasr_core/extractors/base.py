"""What every guidance extractor shares: input checks and resizing to and from its native size.

Extractors take LR images ``B×3×H×W`` in [0, 1] (``B×1×H×W`` grayscale is promoted), run at
their own native resolution and return maps resized back to ``H×W``. Tensors in, tensors out:
no PIL here (image files are the pipeline's business).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import DeviceDtypeMixin

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RANGE_TOLERANCE = 1e-4
#: set while a caller that has checked the values already runs several extractors on them
_VALUES_CHECKED: ContextVar[bool] = ContextVar("megasr_extractor_values_checked", default=False)


@contextmanager
def values_checked() -> Iterator[None]:
    """Within the block, :func:`check_images` skips the value-range check: reading the range back
    waits for the GPU, and the caller (``GuidanceExtractors``) has checked these images once."""
    token = _VALUES_CHECKED.set(True)
    try:
        yield
    finally:
        _VALUES_CHECKED.reset(token)


PREPROCESSOR_FILE = "preprocessor_config.json"


def read_preprocessing(
    directory: Path,
    mean: Sequence[float],
    std: Sequence[float],
    short_side: int | None = None,
    size_keys: Sequence[str] = ("shortest_edge", "height"),
) -> tuple[tuple[float, ...], tuple[float, ...], int | None]:
    """(mean, std, short side) from a checkpoint's ``preprocessor_config.json``, else the defaults.

    ``size_keys`` are tried in order inside its ``size`` entry.
    """
    path = directory / PREPROCESSOR_FILE
    if not path.is_file():
        return tuple(mean), tuple(std), short_side
    data = json.loads(path.read_text())
    size = data.get("size", {})
    for key in size_keys:
        if key in size:
            short_side = int(size[key])
            break
    return tuple(data.get("image_mean", mean)), tuple(data.get("image_std", std)), short_side


def check_images(images: torch.Tensor) -> torch.Tensor:
    """Validate a batch of LR images and return it as ``B×3×H×W`` (grayscale promoted)."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must be B×C×H×W, got shape {tuple(images.shape)}")
    batch, channels, height, width = images.shape
    if batch == 0:
        raise ValueError("images is an empty batch (B = 0)")
    if height < 1 or width < 1:
        raise ValueError(f"images must be at least 1×1, got {height}×{width}")
    if channels not in (1, 3):
        raise ValueError(f"images must have 3 (RGB) or 1 (grayscale) channels, got {channels}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
    if not _VALUES_CHECKED.get():
        low, high = (float(v) for v in torch.stack(torch.aminmax(images)).tolist())  # one read-back
        if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE or not math.isfinite(high):
            raise ValueError(f"images must hold values in [0, 1], got [{low:.4g}, {high:.4g}]")
    images = images.clamp(0, 1)
    return images.expand(-1, 3, -1, -1) if channels == 1 else images


def native_size(
    height: int, width: int, short_side: int, multiple: int = 1, max_long_side: int | None = None
) -> tuple[int, int]:
    """Size keeping the aspect ratio with the short side at ``short_side``, in ``multiple`` steps.

    ``max_long_side`` bounds very elongated inputs (the short side then ends up smaller).
    """
    scale = short_side / min(height, width)
    if max_long_side is not None:
        scale = min(scale, max_long_side / max(height, width))

    def snap(value: float) -> int:
        return max(multiple, int(round(value / multiple)) * multiple)

    return snap(height * scale), snap(width * scale)


def resize(images: torch.Tensor, size: Sequence[int], mode: str = "bicubic") -> torch.Tensor:
    """Resize ``B×C×H×W``; antialiased when shrinking, clamped for bicubic overshoot."""
    size = (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == size:
        return images
    if mode == "nearest":
        return F.interpolate(images, size=size, mode="nearest-exact")
    out = F.interpolate(images, size=size, mode=mode, align_corners=False, antialias=True)
    return out


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = images.new_tensor(mean).view(1, -1, 1, 1)
    std_t = images.new_tensor(std).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def per_image_minmax(maps: torch.Tensor) -> torch.Tensor:
    """Scale each image's map to [0, 1]; a constant map becomes zeros."""
    flat = maps.float().flatten(1)
    shape = (-1, *([1] * (maps.ndim - 1)))
    low = flat.min(dim=1).values.view(shape)
    span = flat.max(dim=1).values.view(shape) - low
    scaled = (maps.float() - low) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, scaled, torch.zeros_like(scaled)).clamp(0, 1)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    top = max(0, (height - size) // 2)
    left = max(0, (width - size) // 2)
    return images[..., top : top + size, left : left + size]


class Extractor(DeviceDtypeMixin, nn.Module):
    """Base of the map extractors: ``forward(images) -> B×C×H×W`` at the input's resolution."""

    #: key of the output in the denoiser's ``guidance`` dict
    name: str = ""

    def _model_input(self, images: torch.Tensor) -> torch.Tensor:
        return check_images(images).to(self.device, self.dtype)


def ceil_to(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)
