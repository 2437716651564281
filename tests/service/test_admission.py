"""Admission of POST /v1/upscale: work bounds, streamed body limits, hostile JSON and images.

Each case here was a worker-killing job or a 500 before: a 1×4096 PNG (a 512 × 2,097,152
canvas), 2048² at scale 8, chunked bodies read whole before the 413, 50,000 nested ``[``, a
5,000-digit seed, a JPEG whose EXIF breaks ``exif_transpose``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from skimage import data

from service.app import create_app
from service.images import check_upload
from tests.service.helpers import make_settings, png

MAX_UPLOAD = 300_000


def flat_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def settings(tmp_path_factory, redis_url):
    return make_settings(
        tmp_path_factory.mktemp("admission"), redis_url, max_upload_bytes=MAX_UPLOAD, max_input_pixels=2048 * 2048
    )


@pytest.fixture()
def raise_server_exceptions() -> bool:
    return False  # an unhandled error comes back as the 500 a server sends, and fails as a wrong status


def post(client, image: bytes, mime: str = "image/png", **fields):
    return client.post("/v1/upscale", files={"image": ("x", image, mime)}, data={k: str(v) for k, v in fields.items()})


def error(response) -> tuple[int, str, str]:
    body = response.json()
    return response.status_code, body["error"]["code"], body["error"]["message"]


def test_the_api_never_imports_torch():
    """The API image has no torch: importing the app (and with it megasr_core.geometry) must not need it."""
    code = (
        "import sys, service.app; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------- work bounds


def test_a_1x4096_strip_is_refused_for_its_aspect_ratio(client):
    status, code, message = error(post(client, flat_png(4096, 1)))
    assert (status, code) == (422, "aspect_ratio")
    assert "4096×1" in message and "16:1" in message and "MEGASR_MAX_ASPECT_RATIO" in message


def test_2048_square_at_scale_8_is_refused_for_its_output(client):
    status, code, message = error(post(client, flat_png(2048, 2048), scale=8))
    assert (status, code) == (422, "work_too_large")
    assert "16384×16384 = 268,435,456 pixel output" in message and "MEGASR_MAX_OUTPUT_PIXELS" in message


def test_the_output_bound_is_inclusive(client):
    """MEGASR_MAX_OUTPUT_PIXELS (4096² by default): 1024² × 4 = 4096² is queued, 1024 × 1025 is not."""
    assert post(client, flat_png(1024, 1024), scale=4).status_code == 202
    assert error(post(client, flat_png(1024, 1025), scale=4))[:2] == (422, "work_too_large")


def test_a_thin_image_within_the_ratio_is_refused_for_its_working_canvas(tmp_path, redis_url):
    """4×400 at ratio 100 is allowed, but its short side enlarged to 512 makes a 512 × 51,200 canvas."""
    settings = make_settings(tmp_path, redis_url, max_aspect_ratio=100)
    with TestClient(create_app(settings)) as client:
        status, code, message = error(post(client, flat_png(4, 400), scale=1))
        assert (status, code) == (422, "work_too_large")
        assert "4×400 image at scale 1 runs on a 512×51200 = 26,214,400 pixel canvas" in message
        assert client.app.state.services.queue.depth() == 0


# ---------------------------------------------------------------- body limits


class CountingBody:
    """An endless request body in 64 KiB chunks that counts how many the server pulled."""

    def __init__(self, head: bytes, filler: bytes, total: int) -> None:
        self.head, self.filler, self.total, self.sent = head, filler, total, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        self.sent = len(self.head)
        chunk = self.filler * (65536 // len(self.filler))
        while self.sent < self.total:
            self.sent += len(chunk)
            yield chunk


def post_streamed(settings, body: CountingBody, content_type: str) -> httpx.Response:
    """POST through httpx's ASGI transport, which hands the app the body chunk by chunk as it asks."""

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.post("/v1/upscale", content=body, headers={"content-type": content_type})

    return asyncio.run(run())


@pytest.mark.parametrize("kind", ["multipart", "json"])
def test_a_chunked_body_is_cut_off_at_the_limit_not_read_whole(settings, kind):
    """8 MiB without Content-Length: 413 after about the limit, not after reading (or spooling) it all."""
    if kind == "multipart":
        head = (
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
        )
        body, content_type = CountingBody(head, b"\0", 8 << 20), "multipart/form-data; boundary=b"
    else:
        body, content_type = CountingBody(b'{"image": "data:image/png;base64,', b"A", 8 << 20), "application/json"
    response = post_streamed(settings, body, content_type)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "upload_too_large"
    assert "MEGASR_MAX_UPLOAD_BYTES" in response.json()["error"]["message"]
    allowed = MAX_UPLOAD * 4 // 3 + 64 * 1024 + 4  # the JSON envelope; multipart's is smaller
    assert body.sent <= allowed + 65536  # at most one chunk past it
    assert body.total > 16 * allowed


def test_a_chunked_upload_within_the_limit_is_queued(settings):
    image = png(24, 16)
    head = (
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--b\r\n"
        b'Content-Disposition: form-data; name="steps"\r\n\r\n3\r\n--b--\r\n'
    )
    response = post_streamed(settings, CountingBody(head, b"\0", 0), "multipart/form-data; boundary=b")
    assert response.status_code == 202, response.text
    assert response.json()["params"]["steps"] == 3 and response.json()["input"] == {"width": 24, "height": 16}


def test_a_declared_length_over_the_limit_is_refused_before_reading(client):
    response = client.post(
        "/v1/upscale", content=b"x" * 10, headers={"content-type": "application/json", "content-length": str(10**9)}
    )
    assert error(response)[:2] == (413, "upload_too_large")


# ---------------------------------------------------------------- hostile JSON


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def post_json_text(client, text: str):
    return client.post("/v1/upscale", content=text.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("50,000 nested arrays", "[" * 50_000),
        ("nested objects past the depth limit", '{"a":' * 33 + "1" + "}" * 33),
        ("a 5,000-digit seed", f'{{"image": "{data_url(png())}", "seed": {"9" * 5000}}}'),
        ("NaN", f'{{"image": "{data_url(png())}", "scale": NaN}}'),
        ("Infinity", f'{{"image": "{data_url(png())}", "guidance_scale": -Infinity}}'),
        ("not UTF-8", '{"image": "\udcff"}'),
    ],
)
def test_hostile_json_is_400_invalid_json(client, name, body):
    response = client.post(
        "/v1/upscale", content=body.encode("utf-8", "surrogateescape"), headers={"content-type": "application/json"}
    )
    assert error(response)[:2] == (400, "invalid_json"), name


def test_brackets_inside_strings_do_not_count_as_nesting(client):
    body = json.dumps({"image": data_url(png()), "prompt": "[" * 400})
    assert post_json_text(client, body).status_code == 202


def test_nesting_up_to_the_limit_reaches_parameter_validation(client):
    body = json.dumps({"image": data_url(png()), "prompt": json.loads("[" * 31 + "]" * 31)})
    assert error(post_json_text(client, body))[:2] == (422, "invalid_parameters")


def test_a_5000_digit_seed_in_a_form_field_is_422(client):
    assert error(post(client, png(), seed="9" * 5000))[:2] == (422, "invalid_parameters")


# ---------------------------------------------------------------- hostile images


def jpeg_with_broken_exif() -> bytes:
    """A JPEG whose EXIF (orientation 6, then a tag of the wrong type) makes exif_transpose raise struct.error."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Camera"
    broken = exif.tobytes().replace(b"\x01\x0f\x00\x02", b"\x01\x52\x00\x02")  # Make → ExtraSamples, as ASCII
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((40, 30)).save(buffer, format="JPEG", exif=broken)
    return buffer.getvalue()


def test_a_phone_photo_is_measured_upright_by_its_exif_orientation(client):
    """Orientation 6 (the camera held on its side): 40×30 as stored, 30×40 as seen, and the limits and the
    job's recorded size go by what is seen."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((40, 30)).save(buffer, format="JPEG", exif=exif)
    response = post(client, buffer.getvalue(), "image/jpeg")
    assert response.status_code == 202, response.text
    assert response.json()["input"] == {"width": 30, "height": 40}


def test_a_jpeg_with_broken_exif_is_queued_unrotated(client):
    response = post(client, jpeg_with_broken_exif(), "image/jpeg")
    assert response.status_code == 202, response.text
    assert response.json()["input"] == {"width": 40, "height": 30}


def test_the_worker_opens_the_same_jpeg_at_the_same_size():
    from megasr_core.pipelines import open_image

    assert open_image(jpeg_with_broken_exif()).size == (40, 30)


def test_a_phone_camera_mpo_is_a_jpeg(client):
    buffer = io.BytesIO()
    frame = Image.fromarray(data.astronaut()).resize((32, 24))
    frame.save(buffer, format="MPO", save_all=True, append_images=[frame.resize((16, 12))])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    checked = check_upload(buffer.getvalue(), "image/jpeg", MAX_UPLOAD, 10**6)
    assert (checked.content_type, checked.width, checked.height) == ("image/jpeg", 32, 24)


@pytest.fixture()
def probe_plugin():
    """A Pillow plug-in that claims every file and records each time Pillow tries to decode with it."""
    from PIL import ImageFile

    tried: list[int] = []

    class ProbeImageFile(ImageFile.ImageFile):
        format = "PROBE"

        def _open(self) -> None:
            tried.append(1)
            raise SyntaxError("not a probe file")

    Image.init()
    Image.register_open("PROBE", ProbeImageFile, lambda prefix: True)
    try:
        yield tried
    finally:
        Image.OPEN.pop("PROBE", None)
        Image.ID.remove("PROBE")


def test_only_the_accepted_formats_decoders_run(probe_plugin):
    from megasr_core.pipelines import InvalidImageError, open_image

    with pytest.raises(Exception) as err:
        check_upload(b"P6\n4 4\n255\n" + bytes(48), "image/x-portable-pixmap", MAX_UPLOAD, 10**6)
    assert getattr(err.value, "status", None) in (400, 415)
    # Only the probe claims these bytes: named by its signature check, never decoded by it.
    assert refusal(b"not an image at all, but long enough")[:2] == (415, "unsupported_image_format")
    with pytest.raises(InvalidImageError):
        open_image(b"not an image at all, but long enough")
    assert check_upload(png(), "image/png", MAX_UPLOAD, 10**6).width == 24
    assert probe_plugin == []


def test_a_corrupt_file_of_an_unaccepted_format_is_named_not_decoded():
    """PPM's own header parser would fail on this (a 400 about a corrupt image); only the accepted formats'
    decoders run, so the signature names the format instead."""
    assert refusal(b"P6\nxx")[:2] == (415, "unsupported_image_format")


@pytest.mark.parametrize(
    ("data", "max_bytes", "max_pixels", "expected"),
    [
        (b"", 10, 10, (400, "empty_image", "the image is empty (0 bytes)")),
        (bytes(1001), 1000, 10, (413, "upload_too_large", "the upload is 1,001 bytes; the limit is 1,000")),
        (None, 10**6, 383, (413, "too_many_pixels", "the image has 24×16 = 384 pixels; the limit is 383")),
    ],
)
def test_each_limit_refusal_says_what_was_sent_and_what_the_limit_is(data, max_bytes, max_pixels, expected):
    from service.errors import ApiError

    with pytest.raises(ApiError) as refused:
        check_upload(png() if data is None else data, "image/png", max_bytes, max_pixels)
    assert (refused.value.status, refused.value.code, refused.value.message) == expected


def test_an_image_pillow_calls_a_decompression_bomb_is_refused_before_decoding(monkeypatch):
    """Pillow's own guard (MAX_IMAGE_PIXELS) fires while the header is read, before our pixel limit."""
    upload = png()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 24×16 = 384 pixels is over it
    assert refusal(upload) == (413, "too_many_pixels", "the image declares too many pixels to decode safely")


def test_any_other_decoder_error_is_a_400_naming_only_its_type(monkeypatch):
    """Hostile bytes make decoders raise assorted exceptions (ZeroDivisionError, struct.error…): the client
    gets a 400 with the exception's type, never its text."""
    from PIL import PngImagePlugin

    def broken(self):
        raise ZeroDivisionError("division by zero in /usr/lib/python3/dist-packages/PIL/secret.py")

    upload = png()
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", broken)
    assert refusal(upload) == (400, "invalid_image", "the image cannot be decoded (ZeroDivisionError)")


@pytest.mark.parametrize(
    "declared", ["application/octet-stream", "Application/Octet-Stream; name=x.png", "image/png; charset=binary", None]
)
def test_an_image_sent_as_generic_bytes_or_with_parameters_is_accepted(declared):
    assert check_upload(png(), declared, MAX_UPLOAD, 10**6).content_type == "image/png"


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (7, 1)])
def test_a_one_pixel_wide_or_high_image_is_accepted(size):
    checked = check_upload(png(*size), "image/png", MAX_UPLOAD, 10**6)
    assert (checked.width, checked.height) == size


def test_a_known_unaccepted_format_is_415_by_its_signature(client):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PPM")
    status, code, message = error(post(client, buffer.getvalue()))
    assert (status, code) == (415, "unsupported_image_format") and "PPM" in message


def refusal(data: bytes) -> tuple[int, str, str]:
    from service.errors import ApiError

    with pytest.raises(ApiError) as refused:
        check_upload(data, None, MAX_UPLOAD, 10**6)
    return refused.value.status, refused.value.code, refused.value.message


def test_each_kind_of_undecodable_upload_gets_its_own_status_and_message():
    """Not an image at all: 400; an accepted format with a broken header: 400 naming it; another format: 415
    naming it and the accepted ones (the messages are the API's documented answers, so they are exact)."""
    assert refusal(b"not an image at all, but long enough") == (
        400,
        "invalid_image",
        "the data is not an image in a supported format",
    )
    assert refusal(b"\x89PNG\r\n\x1a\n" + b"\xff" * 40) == (
        400,
        "invalid_image",
        "the PNG image is corrupt (its header cannot be read)",
    )
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PPM")
    assert refusal(buffer.getvalue()) == (
        415,
        "unsupported_image_format",
        "the image looks like PPM, a format not supported; send PNG, JPEG, WEBP, BMP, TIFF, GIF",
    )
