"""Decode budgets: what an image may cost to decode, checked before and while it is decoded.

Two rules, shared by the API's admission (``service.images``) and the worker's input decode
(``worker.input_image``), so the worker never spends longer on an input than the API allowed:

- **JPEG scans.** A progressive JPEG's decoder walks every block of the image once per scan,
  so a small file that repeats one scan thousands of times costs minutes of CPU. Real encoders
  write about 10 scans (libjpeg's progressive script) to a few dozen (mozjpeg's optimised ones);
  libtiff stops its own JPEG decoder at 100. :func:`check_jpeg_scans` counts the SOS markers by
  walking the marker segments before any decoder runs; it also refuses files of absurdly many
  segments, which would cost the walk (and Pillow's own marker parser) seconds of Python.
- **Decode time.** Pillow's decoders cannot be interrupted from Python, but for PNG, JPEG, GIF
  and BMP its ``ImageFile.load`` reads the file in chunks (or, for Python decoders such as BMP's
  RLE, byte by byte) between calls into the decoder. :class:`BudgetedReader` is the file object
  those reads go to: each read checks the CPU time this thread has spent since the reader was
  made and stops the decode once it is over the budget. That costs one clock read per chunk,
  where a decode in a subprocess would cost a process per upload and a copy of the image.
  Formats that read everything first and then decode in one call (WebP, libtiff's TIFF) are
  checked once more after the decode (:meth:`BudgetedReader.check`): bounded, not interrupted.
  The clock is the thread's CPU time, so a busy machine does not turn a normal image away.
"""

from __future__ import annotations

import io
import re
import time

#: a marker: 0xFF then a code that is not stuffing (0x00), a fill byte (0xFF) or a restart marker
#: (0xD0-0xD7); the last two and stuffing also occur inside entropy-coded data, so a search for
#: this pattern from the end of a segment skips a scan's data at C speed
_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")
_SOI, _EOI, _SOS, _TEM = 0xD8, 0xD9, 0xDA, 0x01
JPEG_SIGNATURE = b"\xff\xd8\xff"
#: the settings' defaults (``MEGASR_MAX_JPEG_SCANS``, ``MEGASR_MAX_DECODE_SECONDS``)
DEFAULT_MAX_JPEG_SCANS = 100
DEFAULT_MAX_DECODE_SECONDS = 5.0


class DecodeRefused(Exception):
    """An image over a decode budget; ``code`` is the API's error code, the message is for users.

    Deliberately not an ``OSError``/``ValueError``: Pillow and ``open_image`` turn those into
    "corrupt image", and this must reach the caller as itself.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def jpeg_structure(data: bytes, max_scans: int | None = None, max_segments: int | None = None) -> tuple[int, int]:
    """(scans, marker segments) of the first image in a JPEG file, up to its EOI.

    Walks SOI, then each marker segment by its length; after a scan's header, the next marker
    is found by a regular-expression search, which steps over the entropy-coded data (with its
    0xFF00 stuffing and RST markers) in C. Garbage between segments is skipped as libjpeg does.
    Stops once either count is past its limit, so a file of millions of tiny segments costs no
    more Python steps than the limits allow. A truncated file counts what it has (the decoder
    reports the truncation).
    """
    if not data.startswith(b"\xff\xd8"):
        return 0, 0
    scans, segments, pos, end = 0, 0, 2, len(data)
    while pos < end:
        found = _MARKER.search(data, pos)
        if found is None:
            break
        code, pos = data[found.end() - 1], found.end()
        if code == _EOI:
            break
        segments += 1
        if max_segments is not None and segments > max_segments:
            break
        if code in (_SOI, _TEM):  # no length follows
            continue
        if pos + 2 > end:
            break
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:  # corrupt: the decoder will say so
            break
        pos += length
        if code == _SOS:
            scans += 1
            if max_scans is not None and scans > max_scans:
                break
    return scans, segments


def count_jpeg_scans(data: bytes) -> int:
    """The number of scans (SOS markers) of the first image in a JPEG file."""
    return jpeg_structure(data)[0]


def max_jpeg_segments(max_scans: int) -> int:
    """Marker segments a JPEG may have: a few per scan (its DHT, DRI, COM) and up to 1,000 more
    for metadata (an ICC profile is at most 255 APP2 chunks, extended XMP a few hundred APP1)."""
    return 1_000 + 4 * max_scans


def check_jpeg_scans(data: bytes, max_scans: int) -> None:
    """Raise :class:`DecodeRefused` for a JPEG with more than ``max_scans`` scans
    (``too_many_scans``) or more marker segments than :func:`max_jpeg_segments` (``too_many_segments``)."""
    if not data.startswith(JPEG_SIGNATURE):
        return
    segment_limit = max_jpeg_segments(max_scans)
    scans, segments = jpeg_structure(data, max_scans=max_scans, max_segments=segment_limit)
    if scans > max_scans:
        raise DecodeRefused(
            "too_many_scans",
            f"the JPEG has more than {max_scans} scans (progressive passes); real encoders "
            f"write far fewer, and each one costs a pass over every pixel (MEGASR_MAX_JPEG_SCANS)",
        )
    if segments > segment_limit:
        raise DecodeRefused(
            "too_many_segments",
            f"the JPEG has more than {segment_limit:,} marker segments; real encoders write "
            f"far fewer (the limit is 1,000 + 4 × MEGASR_MAX_JPEG_SCANS)",
        )


class BudgetedReader(io.BytesIO):
    """The image's bytes as a file whose every read stops the decode once ``seconds`` of this
    thread's CPU time have passed since it was made (see the module's docstring)."""

    def __init__(self, data: bytes, seconds: float) -> None:
        super().__init__(data)
        self.seconds = seconds
        self.started = time.thread_time()

    def read(self, size: int | None = -1) -> bytes:
        self.check()
        return super().read(size)

    def read1(self, size: int | None = -1) -> bytes:
        self.check()
        return super().read1(size)

    def readinto(self, buffer) -> int:  # type: ignore[override]
        self.check()
        return super().readinto(buffer)

    def check(self) -> None:
        """Raise :class:`DecodeRefused` (``decode_too_slow``) once the budget is spent."""
        spent = time.thread_time() - self.started
        if spent > self.seconds:
            raise DecodeRefused(
                "decode_too_slow",
                f"decoding the image took over {self.seconds:g} s of CPU time, the limit (MEGASR_MAX_DECODE_SECONDS)",
            )
