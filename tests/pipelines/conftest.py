"""Fixtures: a tiny weights directory and the pipeline loaded from it, once per session."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from megasr_core.pipelines import MegaSRPipeline


@pytest.fixture(scope="session")
def pipeline(tiny_pipeline) -> MegaSRPipeline:
    return tiny_pipeline


def png_bytes(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def cat() -> Image.Image:
    return Image.fromarray(data.chelsea())  # 451×300 RGB photo


@pytest.fixture(scope="session")
def small_cat(cat) -> Image.Image:
    return cat.resize((40, 28), Image.Resampling.BICUBIC)


def exif_rotated_jpeg(image: Image.Image, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    return buffer.getvalue()


def sixteen_bit_png(width: int = 24, height: int = 16) -> bytes:
    ramp = np.linspace(0, 65535, width * height).reshape(height, width).astype(np.uint16)
    return png_bytes(Image.fromarray(ramp))
