"""Decode budgets: a progressive-JPEG scan bomb and a slow decode are refused in seconds, by the
API before its 202 and by the worker before its pipeline; real photos still pass."""

from __future__ import annotations

import io
import re
import struct
import time
from pathlib import Path

import pytest
import skimage
from PIL import Image
from rq.worker import SimpleWorker

from service.contracts import JobStatus
from service.decode_budget import count_jpeg_scans, jpeg_structure
from service.errors import ApiError
from service.images import check_upload
from service.jobsystem.services import build_services
from service.logging_setup import log_fields
from tests.service.helpers import StandIn, admit, make_settings
from worker import tasks
from worker.main import make_worker
from worker.runtime import install_runtime

_NEXT_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")


def scan_bomb(size: int = 2048, copies: int = 20_000) -> bytes:
    """A valid grayscale progressive JPEG whose first AC scan (SOS header and entropy data) is
    repeated ``copies`` times after itself: a few bytes each, a pass over every block each."""
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((size, size)).save(buffer, format="JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    start = next(m.start() for m in re.finditer(rb"\xff\xda", data) if data[m.start() + 7] > 0)  # Ss > 0: AC
    header_end = start + 2 + int.from_bytes(data[start + 2 : start + 4], "big")
    end = _NEXT_MARKER.search(data, header_end).start()
    return data[:end] + data[start:end] * copies + data[end:]


def rle_spin_bmp(junk_pairs: int) -> bytes:
    """A valid 16×16 8-bit RLE BMP whose first row is followed by ``junk_pairs`` runs that add no
    pixels: Pillow's Python RLE decoder reads them two bytes at a time (about 0.4 s per MB)."""
    width = height = 16
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    row = bytes((width, 7))
    pixels = row + b"\x10\x07" * junk_pairs + (b"\x00\x00" + row) * (height - 1) + b"\x00\x01"
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def settings(tmp_path_factory, redis_url):
    return make_settings(
        tmp_path_factory.mktemp("budget"),
        redis_url,
        max_upload_bytes=4_000_000,
        max_input_pixels=2048 * 2048,
        max_decode_seconds=0.25,
    )


def post(client, image: bytes, name: str):
    return client.post(
        "/v1/upscale", files={"image": (name, image, "application/octet-stream")}, data={"scale": "2", "steps": "2"}
    )


def test_a_20000_scan_jpeg_bomb_gets_a_4xx_within_3_s(client):
    bomb = scan_bomb()
    started = time.monotonic()
    response = post(client, bomb, "bomb.jpg")
    elapsed = time.monotonic() - started
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "too_many_scans" and "MEGASR_MAX_JPEG_SCANS" in error["message"]
    assert elapsed < 3, f"{elapsed:.1f} s"


def test_a_slow_decode_is_stopped_at_the_budget_not_finished(client):
    """2 MB of do-nothing RLE runs: about a second of Pillow's Python decoder, stopped at 0.25 s."""
    started = time.monotonic()
    response = post(client, rle_spin_bmp(1_000_000), "spin.bmp")
    elapsed = time.monotonic() - started
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "decode_too_slow"
    assert elapsed < 2, f"{elapsed:.1f} s"


def test_a_real_progressive_jpeg_is_still_accepted_over_http(client):
    photo = Image.fromarray(skimage.data.astronaut())
    response = post(client, encoded(photo, "JPEG", progressive=True, optimize=True), "photo.jpg")
    assert response.status_code == 202, response.text


def _photos() -> list[tuple[str, bytes]]:
    """skimage's bundled JPEGs as they are, and its photos re-encoded as progressive JPEGs."""
    folder = Path(skimage.__file__).parent / "data"
    cases = [(path.name, path.read_bytes()) for path in sorted(folder.glob("*.jpg"))]
    for name in ("astronaut", "camera", "coffee", "chelsea"):
        photo = Image.fromarray(getattr(skimage.data, name)())
        cases.append((f"{name} progressive", encoded(photo, "JPEG", progressive=True)))
        cases.append((f"{name} progressive optimized", encoded(photo, "JPEG", progressive=True, optimize=True)))
    cmyk = Image.fromarray(skimage.data.coffee()).convert("CMYK")
    cases.append(("coffee CMYK progressive", encoded(cmyk, "JPEG", progressive=True)))
    return cases


@pytest.mark.parametrize(("name", "data"), _photos(), ids=[name for name, _ in _photos()])
def test_real_jpegs_pass_under_the_default_budgets(name, data):
    assert count_jpeg_scans(data) <= 20
    checked = check_upload(data, "image/jpeg", 20 * 1024 * 1024, 4096 * 4096)
    assert checked.width > 0


def test_scans_are_counted_across_stuffing_restart_markers_and_repeats():
    gradient = Image.linear_gradient("L").resize((256, 256))
    noise = Image.effect_noise((256, 256), 90).convert("RGB")  # entropy data full of 0xFF00 stuffing
    assert count_jpeg_scans(encoded(noise, "JPEG")) == 1
    assert count_jpeg_scans(encoded(noise, "JPEG", restart_marker_blocks=1)) == 1
    assert count_jpeg_scans(encoded(noise, "JPEG", progressive=True, restart_marker_rows=1)) == 10
    assert count_jpeg_scans(encoded(gradient, "JPEG", progressive=True)) == 6
    small_bomb = scan_bomb(size=64, copies=300)
    assert count_jpeg_scans(small_bomb) == 306
    Image.open(io.BytesIO(small_bomb)).load()  # the bomb is a JPEG Pillow decodes: only its cost is wrong
    assert jpeg_structure(small_bomb, max_scans=100)[0] == 101
    assert count_jpeg_scans(b"\x89PNG\r\n\x1a\n") == 0


def test_a_jpeg_of_a_million_empty_segments_is_refused_without_walking_them_all():
    """4 MB of empty COM segments: seconds of Python for a full walk (and for Pillow's own
    marker parser); the walk stops at its segment limit instead."""
    photo = encoded(Image.linear_gradient("L"), "JPEG")
    flood = photo[:2] + b"\xff\xfe\x00\x02" * 1_000_000 + photo[2:]
    started = time.thread_time()
    with pytest.raises(ApiError) as refused:
        check_upload(flood, "image/jpeg", 20 * 1024 * 1024, 4096 * 4096)
    assert (refused.value.status, refused.value.code) == (422, "too_many_segments")
    assert time.thread_time() - started < 0.5


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF", "GIF"])
def test_every_format_is_held_to_the_decode_budget(fmt):
    """Formats decoded in chunks are stopped between chunks; WebP (one call) is refused after it."""
    image = Image.effect_noise((1024, 1024), 60).convert("RGB")
    data = encoded(image, fmt, **({"compression": "tiff_lzw"} if fmt == "TIFF" else {}))
    assert check_upload(data, None, 20 * 1024 * 1024, 4096 * 4096).width == 1024
    with pytest.raises(ApiError) as refused:
        check_upload(data, None, 20 * 1024 * 1024, 4096 * 4096, max_decode_seconds=0.0005)
    assert (refused.value.status, refused.value.code) == (422, "decode_too_slow")


@pytest.fixture()
def services(tmp_path, db_url, monkeypatch):
    monkeypatch.setattr(tasks, "RETRY_BACKOFF_S", 0.0)
    settings = make_settings(tmp_path, db_url, max_decode_seconds=0.25)
    with log_fields():
        yield settings, build_services(settings)


@pytest.mark.parametrize(
    ("payload", "words"),
    [(lambda: scan_bomb(size=512, copies=2_000), "scans"), (lambda: rle_spin_bmp(1_000_000), "CPU time")],
    ids=["scan bomb", "slow decode"],
)
def test_the_worker_applies_the_same_budgets_before_its_pipeline(services, payload, words):
    """An input stored before the rule (or under a laxer one) fails as invalid_input in seconds."""
    settings, svc = services
    job_id = admit(svc)
    svc.storage.put(svc.jobs.get(job_id).input_key, payload(), "application/octet-stream")
    install_runtime(settings, StandIn(), services=svc)
    make_worker(SimpleWorker, svc.redis, settings.queue_name).work(burst=True)
    record = svc.jobs.get(job_id)
    assert record.status == JobStatus.failed and record.error.code == "invalid_input"
    assert words in record.error.message
    took = (record.finished_at - record.started_at).total_seconds()  # the attempt, not RQ's start and stop
    assert took < 3, f"{took:.1f} s"
