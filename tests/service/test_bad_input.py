"""Every kind of bad input gets the right 4xx JSON error, and the service stays healthy."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from tests.service.helpers import make_settings, png


def zero_width_png() -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 16, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def settings(tmp_path_factory, redis_url):
    return make_settings(
        tmp_path_factory.mktemp("bad"), redis_url, max_upload_bytes=300_000, max_input_pixels=1_000_000
    )


def multipart(client, image=b"", content_type="image/png", **fields):
    files = {"image": ("x.png", image, content_type)}
    return client.post("/v1/upscale", files=files, data={k: str(v) for k, v in fields.items()})


CASES = {
    # the image itself
    "empty file": (lambda c: multipart(c, b""), 400, "empty_image"),
    "text sent as image/png": (lambda c: multipart(c, b"hello world, not pixels"), 400, "invalid_image"),
    "truncated png": (lambda c: multipart(c, png(64, 64)[:300]), 400, "invalid_image"),
    "zero-dimension header": (lambda c: multipart(c, zero_width_png()), 400, None),
    "decompression bomb": (lambda c: multipart(c, bomb_png()), 413, "too_many_pixels"),
    "too many pixels": (lambda c: multipart(c, _flat(1100, 1000)), 413, "too_many_pixels"),
    "too many bytes": (lambda c: multipart(c, b"\x89PNG" + b"0" * 400_000), 413, "upload_too_large"),
    "pdf bytes": (
        lambda c: multipart(c, b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n"),
        400,
        "invalid_image",
    ),
    "text content type": (lambda c: multipart(c, png(), content_type="text/plain"), 415, "unsupported_media_type"),
    "unsupported format (ICO)": (lambda c: multipart(c, _ico()), 415, "unsupported_image_format"),
    "no image field": (
        lambda c: c.post("/v1/upscale", data={"scale": "4"}, files={"other": ("a", b"x")}),
        422,
        "invalid_parameters",
    ),
    "empty body": (
        lambda c: c.post("/v1/upscale", content=b"", headers={"content-type": "multipart/form-data; boundary=x"}),
        422,
        None,
    ),
    "no content type": (lambda c: c.post("/v1/upscale", content=b"raw bytes"), 415, "unsupported_media_type"),
    # JSON bodies
    "invalid json": (
        lambda c: c.post("/v1/upscale", content=b"{not json", headers={"content-type": "application/json"}),
        400,
        "invalid_json",
    ),
    "json array": (lambda c: c.post("/v1/upscale", json=[1, 2]), 422, "invalid_parameters"),
    "json image not a data url": (
        lambda c: c.post("/v1/upscale", json={"image": "http://example.com/a.png"}),
        422,
        "invalid_parameters",
    ),
    "json image a number": (lambda c: c.post("/v1/upscale", json={"image": 12}), 422, "invalid_parameters"),
    "invalid base64": (
        lambda c: c.post("/v1/upscale", json={"image": "data:image/png;base64,@@@###"}),
        400,
        "invalid_base64",
    ),
    "huge base64": (
        lambda c: c.post("/v1/upscale", json={"image": "data:image/png;base64," + "A" * 600_000}),
        413,
        "upload_too_large",
    ),
    # parameters
    "scale not a number": (lambda c: multipart(c, png(), scale="abc"), 422, "invalid_parameters"),
    "negative scale": (lambda c: multipart(c, png(), scale=-1), 422, "invalid_parameters"),
    "absurd scale": (lambda c: multipart(c, png(), scale=1000), 422, "invalid_parameters"),
    "scale nan": (lambda c: multipart(c, png(), scale="nan"), 422, "invalid_parameters"),
    "zero steps": (lambda c: multipart(c, png(), steps=0), 422, "invalid_parameters"),
    "absurd steps": (lambda c: multipart(c, png(), steps=10**9), 422, "invalid_parameters"),
    "fractional steps": (lambda c: multipart(c, png(), steps=2.5), 422, "invalid_parameters"),
    "negative guidance": (lambda c: multipart(c, png(), guidance_scale=-3), 422, "invalid_parameters"),
    "unknown color fix": (lambda c: multipart(c, png(), color_fix="sepia"), 422, "invalid_parameters"),
    "unknown output format": (lambda c: multipart(c, png(), output_format="gif"), 422, "invalid_parameters"),
    "negative seed": (lambda c: multipart(c, png(), seed=-1), 422, "invalid_parameters"),
    "prompt too long": (lambda c: multipart(c, png(), prompt="x" * 2000), 422, "invalid_parameters"),
    "unknown field": (
        lambda c: c.post("/v1/upscale", json={"image": data_url(png()), "strength": 3}),
        422,
        "invalid_parameters",
    ),
    "wrong json type": (
        lambda c: c.post("/v1/upscale", json={"image": data_url(png()), "steps": "many"}),
        422,
        "invalid_parameters",
    ),
    "bad webhook url": (lambda c: multipart(c, png(), webhook_url="not a url"), 422, "invalid_parameters"),
    "steps true": (
        lambda c: c.post("/v1/upscale", json={"image": data_url(png()), "steps": True}),
        422,
        "invalid_parameters",
    ),
    "seed false": (
        lambda c: c.post("/v1/upscale", json={"image": data_url(png()), "seed": False}),
        422,
        "invalid_parameters",
    ),
    "idempotency key too long": (
        lambda c: c.post(
            "/v1/upscale", files={"image": ("a.png", png(), "image/png")}, headers={"Idempotency-Key": "k" * 300}
        ),
        422,
        "invalid_parameters",
    ),
    # job routes
    "unknown job": (lambda c: c.get("/v1/jobs/doesnotexist"), 404, "job_not_found"),
    "absurdly long job id": (lambda c: c.get("/v1/jobs/" + "a" * 5000), 404, "job_not_found"),
    "result of an unknown job": (lambda c: c.get("/v1/jobs/nope/result"), 404, "job_not_found"),
    "cancel an unknown job": (lambda c: c.delete("/v1/jobs/nope"), 404, "job_not_found"),
    "wrong method": (lambda c: c.put("/v1/upscale"), 405, "method_not_allowed"),
    "unknown route": (lambda c: c.get("/v2/everything"), 404, "not_found"),
}


def _flat(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "gray").save(buffer, format="PNG")
    return buffer.getvalue()


def _ico() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format="ICO")
    return buffer.getvalue()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_4xx_json_error(client, name):
    call, status, code = CASES[name]
    response = call(client)
    assert response.status_code == status, (name, response.status_code, response.text[:300])
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    assert client.get("/healthz").status_code == 200


def test_result_before_success_is_409(client):
    job_id = multipart(client, png()).json()["id"]
    response = client.get(f"/v1/jobs/{job_id}/result")
    assert response.status_code == 409 and response.json()["error"]["code"] == "not_ready"


def test_rate_limit_and_queue_quota(tmp_path, redis_url):
    settings = make_settings(
        tmp_path,
        redis_url,
        rate_limit_per_minute=3,
        rate_limit_burst=3,
        max_queued_per_tenant=100,
        api_keys="ratelimited-tenant-x:ratelimit-key-1",
    )
    headers = {"Authorization": "Bearer ratelimit-key-1"}
    with TestClient(create_app(settings)) as client:
        statuses = [
            client.post("/v1/upscale", files={"image": ("a.png", png(), "image/png")}, headers=headers).status_code
            for _ in range(5)
        ]
        assert statuses[:3] == [202, 202, 202] and statuses[3:] == [429, 429]
    settings = make_settings(tmp_path, redis_url, max_queued_per_tenant=2, api_keys="quota-tenant-y:quota-key-12")
    headers = {"Authorization": "Bearer quota-key-12"}
    with TestClient(create_app(settings)) as client:
        statuses = [
            client.post("/v1/upscale", files={"image": ("a.png", png(), "image/png")}, headers=headers)
            for _ in range(3)
        ]
        assert [r.status_code for r in statuses] == [202, 202, 429]
        assert statuses[2].json()["error"]["code"] == "queue_quota"
