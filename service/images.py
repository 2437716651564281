"""Validating an uploaded image in the API process (Pillow only: the API never imports torch).

The upload is decoded fully before anything is queued, so nothing malformed reaches a worker:
size in bytes, format, pixel count (decompression bombs), truncation, and what the decode may
cost (``service.decode_budget``: JPEG scans counted before decoding, CPU time while decoding).
Only the accepted formats' decoders are tried, and any decoder failure is the client's 400,
never a 500.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from .decode_budget import (
    DEFAULT_MAX_DECODE_SECONDS,
    DEFAULT_MAX_JPEG_SCANS,
    BudgetedReader,
    DecodeRefused,
    check_jpeg_scans,
)
from .errors import ApiError

log = logging.getLogger(__name__)

#: formats the service accepts, by Pillow's name → MIME type
ACCEPTED_FORMATS = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "GIF": "image/gif",
}
#: formats Pillow reports for files its accepted decoders open: MPO is a phone camera's JPEG
_SAME_AS = {"MPO": "JPEG"}


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    content_type: str
    width: int
    height: int


def check_upload(
    data: bytes,
    declared_type: str | None,
    max_bytes: int,
    max_pixels: int,
    *,
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS,
    max_decode_seconds: float = DEFAULT_MAX_DECODE_SECONDS,
) -> CheckedImage:
    """Decode ``data`` completely; raise :class:`ApiError` (400/413/415/422) if it is not acceptable."""
    if not data:
        raise ApiError(400, "empty_image", "the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ApiError(413, "upload_too_large", f"the upload is {len(data):,} bytes; the limit is {max_bytes:,}")
    declared = (declared_type or "").split(";")[0].strip().lower()
    if declared and not (declared.startswith("image/") or declared == "application/octet-stream"):
        raise ApiError(415, "unsupported_media_type", f"expected an image, got content type {declared!r}")
    try:
        check_jpeg_scans(data, max_jpeg_scans)  # before any decoder runs
        reader = BudgetedReader(data, max_decode_seconds)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(reader, formats=list(ACCEPTED_FORMATS))
            except UnidentifiedImageError:
                raise _unidentified(data) from None
            fmt = _SAME_AS.get(image.format or "", image.format or "")
            if fmt not in ACCEPTED_FORMATS:
                raise _unsupported(fmt)
            width, height = image.size
            if width < 1 or height < 1:
                raise ApiError(400, "empty_image", f"the image has no pixels ({width}×{height})")
            if width * height > max_pixels:
                raise ApiError(
                    413,
                    "too_many_pixels",
                    f"the image has {width}×{height} = {width * height:,} pixels; the limit is {max_pixels:,}",
                )
            image.load()
            reader.check()  # formats decoded in one call (WebP, libtiff) are not stopped, only refused
            oriented = _oriented(image)
    except ApiError:
        raise
    except DecodeRefused as exc:
        raise ApiError(422, exc.code, str(exc)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, "too_many_pixels", "the image declares too many pixels to decode safely") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ApiError(400, "invalid_image", f"the image is truncated or corrupt ({exc})") from None
    except Exception as exc:  # Pillow's decoders raise assorted errors on hostile bytes
        log.info("undecodable upload: %s: %s", type(exc).__name__, exc)
        raise ApiError(400, "invalid_image", f"the image cannot be decoded ({type(exc).__name__})") from None
    return CheckedImage(data=data, content_type=ACCEPTED_FORMATS[fmt], width=oriented.width, height=oriented.height)


def _oriented(image: Image.Image) -> Image.Image:
    """The image turned upright by its EXIF orientation; as stored when the EXIF block is broken
    (the worker's ``open_image`` falls back the same way, so both see the same size)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # struct.error, KeyError, ... from a corrupt EXIF block
        return image


def _signature_format(data: bytes) -> str | None:
    """The Pillow format whose file signature ``data`` starts with, by the plug-ins' prefix checks
    alone (none of their decoders runs), so a known but unaccepted format can be named."""
    Image.init()
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # a prefix check that trips over odd bytes names nothing
            continue
    return None


def _unidentified(data: bytes) -> ApiError:
    """The error for bytes no accepted decoder could open: corrupt (400) or another format (415)."""
    fmt = _signature_format(data)
    if fmt is None:
        return ApiError(400, "invalid_image", "the data is not an image in a supported format")
    if fmt in ACCEPTED_FORMATS:
        return ApiError(400, "invalid_image", f"the {fmt} image is corrupt (its header cannot be read)")
    return _unsupported(fmt)


def _unsupported(fmt: str) -> ApiError:
    return ApiError(
        415,
        "unsupported_image_format",
        f"the image looks like {fmt}, a format not supported; send {', '.join(ACCEPTED_FORMATS)}",
    )
