"""Property: whatever bytes arrive, ``check_upload`` accepts them or answers a 4xx ``ApiError``.

Random bytes, and real photos (scikit-image) saved as every accepted format (JPEG and TIFF with
EXIF orientation) then truncated, bit-flipped, overwritten, spliced or cut into. Any other
exception would be a 500 in the API. Bounded: 200 examples with a per-example deadline.
"""

from __future__ import annotations

import io
import warnings
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage import data

from service.errors import ApiError
from service.images import CheckedImage, check_upload

MAX_BYTES = 200_000
MAX_PIXELS = 512 * 512


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "MegaSR fuzz"
    return exif


def _samples() -> list[bytes]:
    photos = [
        Image.fromarray(data.astronaut()).resize((48, 32)),
        Image.fromarray(data.camera()).resize((40, 40)),
        Image.fromarray(data.chelsea()).resize((30, 20)).convert("RGBA"),
    ]
    out = []
    for index, photo in enumerate(photos):
        for fmt, params in (
            ("PNG", {}),
            ("JPEG", {"exif": _exif(6 + index % 3), "quality": 80}),
            ("WEBP", {"quality": 70}),
            ("GIF", {}),
            ("TIFF", {"exif": _exif(3)}),
            ("BMP", {}),
        ):
            image = photo.convert("RGB") if fmt in ("JPEG", "BMP") else photo
            buffer = io.BytesIO()
            image.save(buffer, format=fmt, **params)
            out.append(buffer.getvalue())
    return out


SAMPLES = _samples()


@st.composite
def mutated(draw) -> bytes:
    """A real image with a few edits: byte overwrites, insertions, deletions, a truncation."""
    raw = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["set", "flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        if kind == "set" and raw:
            raw[at] = draw(st.integers(0, 255))
        elif kind == "flip" and raw:
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del raw[at : at + draw(st.integers(1, 64))]
        else:
            del raw[at:]
    return bytes(raw)


uploads = st.one_of(
    st.binary(max_size=4096),
    st.sampled_from(SAMPLES).flatmap(lambda raw: st.integers(0, len(raw)).map(lambda n: raw[:n])),
    mutated(),
    mutated(),
)
declared_types = st.sampled_from([None, "image/png", "image/jpeg", "application/octet-stream", "image/anything"])


def test_the_samples_are_accepted():
    for raw in SAMPLES:
        checked = check_upload(raw, None, MAX_BYTES, MAX_PIXELS)
        assert checked.data == raw and checked.width > 0


@settings(
    max_examples=200,
    deadline=timedelta(seconds=2),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(raw=uploads, declared=declared_types)
def test_any_upload_is_accepted_or_a_4xx(raw, declared):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about corrupt EXIF and truncated files
        try:
            checked = check_upload(raw, declared, MAX_BYTES, MAX_PIXELS)
        except ApiError as exc:
            assert 400 <= exc.status < 500, (exc.status, exc.code, exc.message)
            assert exc.code and exc.message
            return
    assert isinstance(checked, CheckedImage)
    assert checked.data == raw and 1 <= checked.width * checked.height <= MAX_PIXELS
    assert checked.content_type.startswith("image/")


@pytest.mark.parametrize("raw", SAMPLES[:6], ids=["png", "jpeg", "webp", "gif", "tiff", "bmp"])
def test_every_prefix_of_a_real_image_is_accepted_or_a_4xx(raw):
    """Exhaustive over truncation points for one photo per format (a cheap, complete sweep)."""
    step = max(1, len(raw) // 150)
    for cut in range(0, len(raw), step):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                check_upload(raw[:cut], None, MAX_BYTES, MAX_PIXELS)
            except ApiError as exc:
                assert 400 <= exc.status < 500
