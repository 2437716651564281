"""Fixtures: a tiny weights directory and the pipeline loaded from it, once per session."""

from __future__ import annotations

import pytest
from PIL import Image
from skimage import data

from megasr_core.pipelines import MegaSRPipeline


@pytest.fixture(scope="session")
def pipeline(tiny_pipeline) -> MegaSRPipeline:
    return tiny_pipeline


@pytest.fixture(scope="session")
def cat() -> Image.Image:
    return Image.fromarray(data.chelsea())  # 451×300 RGB photo


@pytest.fixture(scope="session")
def small_cat(cat) -> Image.Image:
    return cat.resize((40, 28), Image.Resampling.BICUBIC)
