"""Links never come from the Host header, unknown hosts are refused, results are streamed."""

from __future__ import annotations

import io
import uuid

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.storage import CHUNK_BYTES, LocalStorage, ObjectNotFound, S3Storage, StoredObject
from tests.service.helpers import make_settings, png, run_worker, submit

EVIL = {"Host": "evil.example"}


def test_links_are_root_relative_without_a_public_url_whatever_the_host(tmp_path, redis_url, tiny_pipeline):
    """No MEGASR_PUBLIC_URL, no allowlist: any Host is answered, but no link carries it."""
    settings = make_settings(tmp_path, redis_url)
    with TestClient(create_app(settings)) as client:
        response = submit(client, png(8, 8), headers=EVIL, steps=1, seed=3)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        assert response.headers["location"] == f"/v1/jobs/{job_id}"
        run_worker(settings, tiny_pipeline)
        job = client.get(f"/v1/jobs/{job_id}", headers=EVIL).json()
        assert job["status"] == "succeeded", job
        assert job["result_url"] == f"/v1/jobs/{job_id}/result"
        # the result is streamed from storage with its length
        result = client.get(job["result_url"])
        services = client.app.state.services
        stored = services.storage.get(services.jobs.get(job_id).output_key)
        assert result.status_code == 200 and result.headers["content-type"] == "image/png"
        assert result.headers["content-length"] == str(len(stored)) and result.content == stored
        assert Image.open(io.BytesIO(result.content)).size == (32, 32)


def test_links_use_the_public_url_and_other_hosts_are_refused(tmp_path, redis_url):
    settings = make_settings(tmp_path, redis_url, public_url="https://sr.example.com/megasr/")
    with TestClient(create_app(settings), base_url="https://sr.example.com") as client:
        response = submit(client)
        assert response.status_code == 202, response.text
        assert response.headers["location"] == f"https://sr.example.com/megasr/v1/jobs/{response.json()['id']}"
        assert submit(client, headers=EVIL).status_code == 400
        assert client.get("/v1/jobs/x", headers=EVIL).status_code == 400
        for host in ("localhost", "127.0.0.1:8000", "SR.example.com"):
            assert client.get(f"/v1/jobs/{uuid.uuid4().hex}", headers={"Host": host}).status_code == 404, host
        # probes and scrapes address the pod by its IP: never refused
        assert client.get("/healthz", headers={"Host": "10.1.2.3:8000"}).status_code == 200
        assert client.get("/readyz", headers={"Host": "10.1.2.3:8000"}).status_code == 200


def test_allowed_hosts_is_the_whole_list_when_set(tmp_path, redis_url):
    settings = make_settings(
        tmp_path, redis_url, public_url="https://sr.example.com", allowed_hosts="api.example.com, *.internal"
    )
    with TestClient(create_app(settings), base_url="https://api.example.com") as client:
        missing = f"/v1/jobs/{uuid.uuid4().hex}"
        assert client.get(missing).status_code == 404
        assert client.get(missing, headers={"Host": "megasr.internal"}).status_code == 404
        for host in ("sr.example.com", "localhost", "evil.example", "internal"):
            assert client.get(missing, headers={"Host": host}).status_code == 400, host


# ---------------------------------------------------------------- streamed reads


def check_streamed(storage, key: str) -> None:
    payload = bytes(range(256)) * (3 * CHUNK_BYTES // 256 + 7)  # three chunks and a bit
    storage.put(key, payload, "application/octet-stream")
    opened = storage.open(key)
    assert isinstance(opened, StoredObject) and opened.size == len(payload)
    chunks = list(opened.chunks)
    assert len(chunks) == 4 and max(len(c) for c in chunks) <= CHUNK_BYTES
    assert b"".join(chunks) == payload
    with pytest.raises(ObjectNotFound):
        storage.open(key + "-missing")


def test_local_storage_streams_in_chunks(tmp_path):
    check_streamed(LocalStorage(tmp_path), "jobs/a/output.png")


def test_s3_storage_streams_in_chunks(s3_endpoint):
    check_streamed(S3Storage("megasr", f"stream-{uuid.uuid4().hex[:6]}", endpoint_url=s3_endpoint), "jobs/a/output.png")
