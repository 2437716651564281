"""The PIL side of the pipeline: decoding, EXIF orientation, modes, alpha, tensors and back.

Everything a user can hand in — a path, bytes, a file object or a PIL image, in any mode
(RGB, RGBA, L, LA, P with transparency, CMYK, 16-bit and float grayscale) — becomes an RGB
float tensor in [0, 1] plus an optional alpha channel that is upscaled separately and put back.
Bad input raises :class:`InvalidImageError` (a ``ValueError``) with a message fit for a user.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

#: default ceiling on decoded pixels (a decompression-bomb guard); callers may pass their own
DEFAULT_MAX_PIXELS = 64_000_000
#: the only decoders Pillow may try on files and bytes: photo formats, not Pillow's long tail of
#: rarely used (and rarely hardened) plug-ins; the same set the service accepts
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")

ImageInput = str | Path | bytes | BinaryIO | Image.Image


class InvalidImageError(ValueError):
    """The input is not a usable image (unreadable, truncated, empty or too large)."""


@dataclass
class PreparedImage:
    """One input image ready for the model."""

    rgb: torch.Tensor  # 3×H×W float32 in [0, 1]
    alpha: np.ndarray | None  # H×W float32 in [0, 1], or None
    source_mode: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), PIL's order."""
        return int(self.rgb.shape[-1]), int(self.rgb.shape[-2])


def open_image(
    source: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS, formats: tuple[str, ...] | None = IMAGE_FORMATS
) -> Image.Image:
    """Decode fully (so truncation is caught here) and apply the EXIF orientation.

    ``formats``: Pillow format names tried on files and bytes (``None`` = every plug-in).
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise InvalidImageError("the image is empty (0 bytes)")
            stream: BinaryIO | str | Path = io.BytesIO(source)
        else:
            stream = source
        if isinstance(stream, (str, Path)) and not Path(stream).is_file():
            raise InvalidImageError(f"no such image file: {stream}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(stream, formats=formats)
                _check_pixels(image, max_pixels)
                image.load()
        except InvalidImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InvalidImageError(f"the image is too large to decode safely ({exc})") from None
        except UnidentifiedImageError:
            raise InvalidImageError("the data is not an image in a supported format") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InvalidImageError(f"the image is truncated or corrupt ({exc})") from None
    if image.width < 1 or image.height < 1:
        raise InvalidImageError(f"the image has no pixels ({image.width}×{image.height})")
    _check_pixels(image, max_pixels)
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not make a good image unusable
        return image


def _check_pixels(image: Image.Image, max_pixels: int | None) -> None:
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise InvalidImageError(
            f"the image has {image.width}×{image.height} = {image.width * image.height:,} pixels; "
            f"the limit is {max_pixels:,}"
        )


def _to_unit_float(array: np.ndarray, mode: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16 or mode.startswith("I;16"):
        return array.astype(np.float32) / 65535.0
    if mode == "I":  # 32-bit integers; PNG's 16-bit grayscale opens this way in older Pillow
        top = 65535.0 if array.max(initial=0) > 255 else 255.0
        return np.clip(array.astype(np.float32) / top, 0, 1)
    if mode == "F":
        array = array.astype(np.float32)
        top = float(array.max(initial=0))
        return np.clip(array / top if top > 1 else array, 0, 1)
    return array.astype(np.float32) / float(np.iinfo(array.dtype).max)


def prepare_image(image: Image.Image) -> PreparedImage:
    """Split an oriented PIL image into RGB in [0, 1] and an optional alpha channel."""
    mode = image.mode
    alpha = None
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        alpha = np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
        image = image.convert("RGB" if image.mode in ("RGBA", "RGBa") else "L")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        gray = _to_unit_float(np.asarray(image), image.mode)
        rgb = np.repeat(gray[..., None], 3, axis=2)
    else:
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8).astype(np.float32) / 255.0
    tensor = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()
    return PreparedImage(rgb=tensor, alpha=alpha, source_mode=mode)


def load_image(source: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> PreparedImage:
    return prepare_image(open_image(source, max_pixels=max_pixels))


def to_pil(rgb: torch.Tensor, alpha: np.ndarray | None = None) -> Image.Image:
    """3×H×W in [0, 1] (+ alpha H×W at the same size) → 8-bit RGB or RGBA PIL image."""
    array = (rgb.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    image = Image.fromarray(array, mode="RGB")
    if alpha is not None:
        image.putalpha(Image.fromarray((np.clip(alpha, 0, 1) * 255.0).round().astype(np.uint8), mode="L"))
    return image


def resize_alpha(alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Upscale an alpha channel to (width, height) with bicubic interpolation."""
    image = Image.fromarray((alpha * 255.0).round().astype(np.uint8), mode="L")
    return np.asarray(image.resize(size, Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
