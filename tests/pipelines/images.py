"""Encoded test images the pipeline's image handling must read: PNG bytes, an EXIF-rotated JPEG, a 16-bit PNG."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def exif_rotated_jpeg(image: Image.Image, orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    return buffer.getvalue()


def sixteen_bit_png(width: int = 24, height: int = 16) -> bytes:
    ramp = np.linspace(0, 65535, width * height).reshape(height, width).astype(np.uint16)
    return png_bytes(Image.fromarray(ramp))
