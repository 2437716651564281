"""Every limit of the API, through real HTTP requests: exactly at the limit is accepted, one past it is refused."""

from __future__ import annotations

import base64
import io
import struct
import uuid
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from tests.service.helpers import make_settings

MAX_BYTES = 4096
MAX_PIXELS = 64 * 64


@pytest.fixture()
def settings(tmp_path, db_url):
    return make_settings(tmp_path, db_url, max_upload_bytes=MAX_BYTES, max_input_pixels=MAX_PIXELS)


def tenant_client(tmp_path, db_url, **limits) -> tuple[TestClient, dict[str, str]]:
    """An app with one API key of a tenant nobody else uses, and that key's headers."""
    tenant, key = f"tenant-{uuid.uuid4().hex[:8]}", f"key-{uuid.uuid4().hex}"
    settings = make_settings(tmp_path, db_url, api_keys=f"{tenant}:{key}", **limits)
    return TestClient(create_app(settings)), {"Authorization": f"Bearer {key}"}


def flat_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_of_exactly(size: int) -> bytes:
    """A valid 8×8 PNG of exactly ``size`` bytes (a tEXt chunk before IEND pads it)."""
    image = flat_png(8, 8)
    head, iend = image[:-12], image[-12:]
    text = b"pad\x00" + b"x" * (size - len(image) - 12 - 4)
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
    padded = head + chunk + iend
    assert len(padded) == size
    Image.open(io.BytesIO(padded)).load()  # still a valid image
    return padded


def post(client, image: bytes, headers=None, **fields):
    files = {"image": ("x.png", image, "image/png")}
    return client.post("/v1/upscale", files=files, data={k: str(v) for k, v in fields.items()}, headers=headers or {})


def post_json(client, image: bytes, **fields):
    return client.post(
        "/v1/upscale", json={"image": "data:image/png;base64," + base64.b64encode(image).decode(), **fields}
    )


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text[:300]
    assert response.json()["error"]["code"] == code, response.json()


# ------------------------------------------------------------------ the image


def test_upload_of_exactly_max_bytes_is_accepted_and_one_more_byte_is_refused(client):
    """MEGASR_MAX_UPLOAD_BYTES: a file of exactly the limit is queued (multipart and JSON); limit + 1 is 413."""
    at_limit, over = png_of_exactly(MAX_BYTES), png_of_exactly(MAX_BYTES + 1)
    assert post(client, at_limit).status_code == 202
    assert post_json(client, at_limit).status_code == 202
    assert_error(post(client, over), 413, "upload_too_large")
    assert_error(post_json(client, over), 413, "upload_too_large")


def test_image_of_exactly_max_pixels_is_accepted_and_one_more_pixel_is_refused(client):
    """MEGASR_MAX_INPUT_PIXELS: 64×64 = 4096 pixels passes; 241×17 = 4097 is 413."""
    assert 241 * 17 == MAX_PIXELS + 1
    accepted = post(client, flat_png(64, 64))
    assert accepted.status_code == 202 and accepted.json()["input"] == {"width": 64, "height": 64}
    assert_error(post(client, flat_png(241, 17)), 413, "too_many_pixels")
    assert_error(post(client, flat_png(17, 241)), 413, "too_many_pixels")


# ------------------------------------------------------------------ parameters

PARAMETER_BOUNDARIES = [
    # field, accepted at the limit, refused one past it
    ("steps", 200, 201),
    ("steps", 1, 0),
    ("scale", 8, 8.001),
    ("scale", 8, 9),
    ("scale", 1, 0.999),
    ("guidance_scale", 20, 20.001),
    ("guidance_scale", 0, -0.001),
    ("seed", 2**53 - 1, 2**53),  # what a JavaScript number holds exactly
    ("seed", 0, -1),
    ("prompt", "p" * 500, "p" * 501),
    ("negative_prompt", "n" * 500, "n" * 501),
]


@pytest.mark.parametrize(
    ("field", "at_limit", "past_limit"),
    PARAMETER_BOUNDARIES,
    ids=[f"{f}={a if not isinstance(a, str) else len(a)}" for f, a, _ in PARAMETER_BOUNDARIES],
)
def test_parameter_at_its_limit_is_accepted_and_past_it_is_422(client, field, at_limit, past_limit):
    """A parameter exactly at its documented bound is queued (and stored as sent); one step past is 422."""
    image = flat_png(8, 8)
    accepted = post(client, image, **{field: at_limit})
    assert accepted.status_code == 202, accepted.text[:300]
    assert accepted.json()["params"][field] == at_limit
    assert_error(post(client, image, **{field: past_limit}), 422, "invalid_parameters")
    assert_error(post_json(client, image, **{field: past_limit}), 422, "invalid_parameters")


def test_idempotency_key_of_200_characters_is_accepted_and_201_refused(client):
    """The Idempotency-Key header may be 1 to 200 characters."""
    image = flat_png(8, 8)
    assert post(client, image, headers={"Idempotency-Key": "k" * 200}).status_code == 202
    assert_error(post(client, image, headers={"Idempotency-Key": "k" * 201}), 422, "invalid_parameters")


# ------------------------------------------------------------------ per tenant


def test_queue_quota_allows_exactly_max_unfinished_jobs(tmp_path, db_url):
    """MEGASR_MAX_QUEUED_PER_TENANT = 2: two unfinished jobs are accepted, the third is 429 until one finishes."""
    client, headers = tenant_client(tmp_path, db_url, max_queued_per_tenant=2)
    with client:
        first = post(client, flat_png(8, 8), headers=headers)
        second = post(client, flat_png(8, 8), headers=headers)
        assert first.status_code == second.status_code == 202
        third = post(client, flat_png(8, 8), headers=headers)
        assert_error(third, 429, "queue_quota")
        assert third.headers["retry-after"]
        assert client.delete(f"/v1/jobs/{first.json()['id']}", headers=headers).status_code == 200  # frees a slot
        assert post(client, flat_png(8, 8), headers=headers).status_code == 202
        assert_error(post(client, flat_png(8, 8), headers=headers), 429, "queue_quota")


def test_rate_limit_allows_exactly_the_burst_then_one_per_refill(tmp_path, db_url):
    """MEGASR_RATE_LIMIT_BURST = 3 at MEGASR_RATE_LIMIT_PER_MINUTE = 1: three POSTs at once are accepted, the
    fourth is 429 with Retry-After = the seconds until the next token (about 60)."""
    client, headers = tenant_client(tmp_path, db_url, rate_limit_per_minute=1, rate_limit_burst=3)
    with client:
        statuses = [post(client, flat_png(8, 8), headers=headers).status_code for _ in range(3)]
        assert statuses == [202, 202, 202]
        limited = post(client, flat_png(8, 8), headers=headers)
        assert_error(limited, 429, "rate_limited")
        assert 50 <= int(limited.headers["retry-after"]) <= 60


# ------------------------------------------------------------------ streamed body limit


def streamed_request(body: bytes, chunk: int = 1000, content_length: int | None = None):
    """A Starlette request whose body arrives in ``chunk``-byte pieces, as a chunked upload does."""
    from starlette.requests import Request

    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [
        {"type": "http.request", "body": piece, "more_body": i < len(pieces) - 1} for i, piece in enumerate(pieces)
    ]

    async def receive():
        return messages.pop(0)

    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, receive)


@pytest.mark.parametrize("chunk", [1000, 4096, 4097])
def test_a_streamed_body_of_exactly_the_limit_is_read_and_one_byte_more_is_413(chunk):
    """Without Content-Length the counted stream is the only check: ``limit`` bytes pass, ``limit + 1`` do not."""
    import asyncio

    from service.body_limits import BodyTooLarge, read_limited

    body = bytes(range(256)) * 16 + b"x"  # 4097 bytes
    assert asyncio.run(read_limited(streamed_request(body[:MAX_BYTES], chunk), MAX_BYTES)) == body[:MAX_BYTES]
    with pytest.raises(BodyTooLarge) as refused:
        asyncio.run(read_limited(streamed_request(body, chunk), MAX_BYTES))
    assert refused.value.status == 413 and refused.value.limit == MAX_BYTES


def test_a_declared_length_of_exactly_the_limit_is_read_and_one_more_is_refused_unread():
    import asyncio

    from service.body_limits import BodyTooLarge, check_declared_length, read_limited

    body = b"y" * MAX_BYTES
    check_declared_length(streamed_request(body, content_length=MAX_BYTES), MAX_BYTES)
    assert asyncio.run(read_limited(streamed_request(body, content_length=MAX_BYTES), MAX_BYTES)) == body
    with pytest.raises(BodyTooLarge):
        check_declared_length(streamed_request(b"", content_length=MAX_BYTES + 1), MAX_BYTES)
