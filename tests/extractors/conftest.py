"""Fixtures: tiny random extractors and real photos from scikit-image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from megasr_core.extractors import GuidanceExtractors, tiny_preset
from megasr_core.weights.tiny import write_tiny_tokenizer


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """HWC or HW uint8 → 1×C×H×W float in [0, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(array)).float() / 255.0
    if tensor.ndim == 2:
        return tensor[None, None]
    return tensor.permute(2, 0, 1)[None]


@pytest.fixture(scope="session")
def photos() -> dict[str, torch.Tensor]:
    """Real photos: RGB, grayscale, an odd-sized crop and a single pixel."""
    astronaut = to_tensor(data.astronaut())
    return {
        "rgb": astronaut,
        "gray": to_tensor(data.camera()),
        "odd": to_tensor(data.coffee())[..., 100:137, 200:253],
        "pixel": astronaut[..., 200:201, 300:301],
        "batch": torch.cat([to_tensor(data.chelsea())[..., :256, :256], astronaut[..., :256, :256]]),
    }


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_extractors(tiny_tokenizer) -> GuidanceExtractors:
    torch.manual_seed(0)
    return GuidanceExtractors.from_preset(tiny_preset(), tokenizer=tiny_tokenizer).eval()
