"""Validating an uploaded image in the API process (Pillow only: the API never imports torch).

The upload is decoded fully before anything is queued, so nothing malformed reaches a worker:
size in bytes, format, pixel count (decompression bombs), truncation.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ApiError

#: formats the service accepts, by Pillow's name → MIME type
ACCEPTED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "BMP": "image/bmp",
                    "TIFF": "image/tiff", "GIF": "image/gif"}


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    content_type: str
    width: int
    height: int


def check_upload(data: bytes, declared_type: str | None, max_bytes: int, max_pixels: int) -> CheckedImage:
    """Decode ``data`` completely; raise :class:`ApiError` (400/413/415) if it is not acceptable."""
    if not data:
        raise ApiError(400, "empty_image", "the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ApiError(413, "upload_too_large", f"the upload is {len(data):,} bytes; the limit is {max_bytes:,}")
    declared = (declared_type or "").split(";")[0].strip().lower()
    if declared and not (declared.startswith("image/") or declared == "application/octet-stream"):
        raise ApiError(415, "unsupported_media_type", f"expected an image, got content type {declared!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = image.format or ""
            if fmt not in ACCEPTED_FORMATS:
                raise ApiError(415, "unsupported_image_format",
                               f"image format {fmt or 'unknown'} is not supported; send {', '.join(ACCEPTED_FORMATS)}")
            width, height = image.size
            if width < 1 or height < 1:
                raise ApiError(400, "empty_image", f"the image has no pixels ({width}×{height})")
            if width * height > max_pixels:
                raise ApiError(413, "too_many_pixels",
                               f"the image has {width}×{height} = {width * height:,} pixels; the limit is {max_pixels:,}")
            image.load()
            oriented = ImageOps.exif_transpose(image)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, "too_many_pixels", "the image declares too many pixels to decode safely") from None
    except UnidentifiedImageError:
        raise ApiError(400, "invalid_image", "the data is not an image in a supported format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ApiError(400, "invalid_image", f"the image is truncated or corrupt ({exc})") from None
    return CheckedImage(data=data, content_type=ACCEPTED_FORMATS[fmt], width=oriented.width, height=oriented.height)
