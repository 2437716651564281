"""The encodings a result is delivered in (PNG, JPEG, WebP): one encoder for the worker and the GPU suite.

Pillow only, no torch: the worker encodes each job's result with it (in a thread pool, a batch's
results side by side), and the GPU suite times the same calls to say what a worker adds per batch.
"""

from __future__ import annotations

import io

from PIL import Image

FORMATS = ("png", "jpeg", "webp")
#: JPEG and WebP quality of every delivered result
QUALITY = 95


def encode(image: Image.Image, fmt: str, quality: int = QUALITY) -> bytes:
    """``image`` as ``fmt`` bytes (JPEG drops the alpha channel, which it cannot hold)."""
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=quality)
    elif fmt == "png":
        image.save(buffer, format="PNG")
    else:
        raise ValueError(f"output format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return buffer.getvalue()
