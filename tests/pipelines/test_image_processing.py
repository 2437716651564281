"""Decoding and mode handling: every mode becomes RGB in [0, 1]; alpha kept aside; bad input named."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from megasr_core.pipelines import InvalidImageError, load_image, to_pil
from tests.pipelines.images import exif_rotated_jpeg, png_bytes, sixteen_bit_png


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "1", "YCbCr"])
def test_modes_become_rgb(small_cat, mode):
    prepared = load_image(small_cat.convert(mode))
    assert prepared.rgb.shape == (3, 28, 40)
    assert prepared.alpha is None
    assert 0 <= prepared.rgb.min() and prepared.rgb.max() <= 1


def test_grayscale_is_promoted_to_equal_channels(small_cat):
    prepared = load_image(small_cat.convert("L"))
    assert (prepared.rgb[0] == prepared.rgb[1]).all() and (prepared.rgb[1] == prepared.rgb[2]).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_alpha_is_split_off(small_cat, mode):
    rgba = small_cat.convert("RGBA")
    alpha = np.zeros((28, 40), dtype=np.uint8)
    alpha[:, 20:] = 255
    rgba.putalpha(Image.fromarray(alpha))
    image = rgba.convert(mode) if mode != "PA" else rgba.convert("P").convert("PA")
    if mode == "PA":
        image.putalpha(Image.fromarray(alpha))
    prepared = load_image(png_bytes(image) if mode != "PA" else image)
    assert prepared.alpha is not None and prepared.alpha.shape == (28, 40)
    assert prepared.alpha[:, :20].max() == 0 and prepared.alpha[:, 20:].min() == 1


def test_palette_with_transparency_keeps_alpha(small_cat):
    palette = small_cat.convert("P")
    palette.info["transparency"] = 0
    prepared = load_image(png_bytes(palette, transparency=0))
    assert prepared.alpha is not None


def test_sixteen_bit_png_keeps_its_range():
    prepared = load_image(sixteen_bit_png())
    assert prepared.source_mode.startswith("I")
    assert prepared.rgb.min() == 0 and prepared.rgb.max() == pytest.approx(1.0)
    assert prepared.rgb.shape == (3, 16, 24)


def test_exif_orientation_is_applied(small_cat):
    prepared = load_image(exif_rotated_jpeg(small_cat, orientation=6))  # "rotate 90° clockwise"
    assert prepared.size == (28, 40)


def test_to_pil_round_trip(small_cat):
    prepared = load_image(small_cat)
    assert np.array_equal(np.asarray(to_pil(prepared.rgb)), np.asarray(small_cat))


def _zero_width_png() -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")

    header = (0).to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "empty"),
        (b"hello, this is text and not a picture", "not an image"),
        ("truncated", "truncated or corrupt"),
        ("zero", "pixels|truncated or corrupt|not an image"),
        ("/nonexistent/picture.png", "no such image file"),
    ],
)
def test_bad_inputs_are_named(small_cat, payload, message):
    if payload == "truncated":
        payload = png_bytes(small_cat)[:200]
    elif payload == "zero":
        payload = _zero_width_png()
    with pytest.raises(InvalidImageError, match=message):
        load_image(payload)


def test_pixel_limit_guards_against_bombs(small_cat):
    with pytest.raises(InvalidImageError, match="limit is 100"):
        load_image(png_bytes(small_cat), max_pixels=100)
    # A real bomb: a tiny file that declares a huge canvas.
    buffer = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 1_000_000
    with pytest.raises(InvalidImageError, match="limit|too large"):
        load_image(buffer.getvalue(), max_pixels=50_000_000)
