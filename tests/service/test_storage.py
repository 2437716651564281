"""Storage against a real directory and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import urllib.request
import uuid

import pytest

from service.storage import LocalStorage, ObjectNotFound, S3Storage, StorageUnavailable, storage_from_url


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "data")
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3Storage("megasr", prefix=f"test-{uuid.uuid4().hex[:8]}", endpoint_url=endpoint)


def test_put_get_exists_delete(storage):
    key = "jobs/abc/input.png"
    assert not storage.exists(key)
    storage.put(key, b"\x89PNG payload", "image/png")
    assert storage.exists(key)
    assert storage.get(key) == b"\x89PNG payload"
    storage.put(key, b"replaced", "image/png")
    assert storage.get(key) == b"replaced"
    storage.delete(key)
    assert not storage.exists(key)
    with pytest.raises(ObjectNotFound):
        storage.get(key)
    storage.delete(key)  # deleting twice is fine
    storage.ping()


@pytest.mark.parametrize("key", ["", "/abs", "../escape", "a/../b", "a//b"])
def test_bad_keys_are_refused(storage, key):
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.put(key, b"x", "text/plain")


def test_presigned_url_serves_the_object(s3_endpoint):
    storage = S3Storage("megasr", prefix="presign", endpoint_url=s3_endpoint)
    storage.put("jobs/x/output.png", b"result bytes", "image/png")
    url = storage.presigned_url("jobs/x/output.png", expires_s=120)
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"result bytes"
    assert LocalStorage.presigned_url(None, "k", 1) is None


def test_presigned_links_are_sigv4_and_signed_for_the_public_endpoint(s3_endpoint):
    """The service reaches the store as 127.0.0.1; clients reach it under another name
    (``localhost`` here, ``localhost:9000`` vs ``minio:9000`` in Compose). The link must name the
    public host and be signed for it: SigV4 signs the host, so rewriting a link cannot work."""
    import urllib.error
    from urllib.parse import urlparse

    public = s3_endpoint.replace("127.0.0.1", "localhost")
    storage = S3Storage(
        "megasr",
        prefix="presign-public",
        endpoint_url=s3_endpoint,
        region="us-east-1",
        public_endpoint_url=public,
        addressing_style="path",
    )
    storage.put("jobs/y/output.png", b"public bytes", "image/png")
    url = storage.presigned_url("jobs/y/output.png", expires_s=120)
    assert urlparse(url).hostname == "localhost"
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url  # SigV4 even in us-east-1 (boto3 would pick SigV2)
    with urllib.request.urlopen(url, timeout=10) as response:  # a plain client, from "outside"
        assert response.read() == b"public bytes"

    internal = S3Storage(
        "megasr", prefix="presign-public", endpoint_url=s3_endpoint, region="us-east-1", addressing_style="path"
    ).presigned_url("jobs/y/output.png", expires_s=120)
    rewritten = internal.replace("127.0.0.1", "localhost", 1)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(rewritten, timeout=10)
    assert refused.value.code == 403


def test_unreachable_s3_is_unavailable(s3_endpoint):
    from tests.harness.ports import free_port

    storage = S3Storage("megasr", endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageUnavailable):
        storage.ping()
    with pytest.raises(StorageUnavailable):
        storage.put("a/b", b"x", "text/plain")
    with pytest.raises(StorageUnavailable):
        S3Storage("no-such-bucket-here", endpoint_url=s3_endpoint).ping()


def test_storage_from_url(tmp_path, s3_endpoint):
    assert isinstance(storage_from_url((tmp_path / "d").as_uri()), LocalStorage)
    s3 = storage_from_url("s3://megasr/some/prefix", endpoint_url=s3_endpoint)
    assert isinstance(s3, S3Storage) and s3.prefix == "some/prefix"
    with pytest.raises(ValueError, match="unsupported storage URL"):
        storage_from_url("ftp://host/x")
    with pytest.raises(ValueError, match="names no bucket"):
        storage_from_url("s3:///prefix")


def test_patient_storage_waits_out_an_outage_then_gives_up(tmp_path):
    """Workers ride out a store restart; a longer outage still surfaces as StorageUnavailable,
    and a missing object is reported at once."""
    from service.storage import LocalStorage, ObjectNotFound, PatientStorage, StorageUnavailable

    class Flaky:
        def __init__(self, inner, failures: int) -> None:
            self.inner, self.failures, self.calls = inner, failures, 0

        def get(self, key):
            self.calls += 1
            if self.calls <= self.failures:
                raise StorageUnavailable("store restarting")
            return self.inner.get(key)

    local = LocalStorage(tmp_path)
    local.put("jobs/a/input", b"pixels")
    waits: list[float] = []
    flaky = Flaky(local, failures=4)
    patient = PatientStorage(flaky, patience_s=60, first_wait_s=0.5, sleep=waits.append)
    assert patient.get("jobs/a/input") == b"pixels"
    assert waits == [0.5, 1.0, 2.0, 4.0]  # exponential back-off between the five tries

    always_down = Flaky(local, failures=10**9)
    with pytest.raises(StorageUnavailable):
        PatientStorage(always_down, patience_s=0.2, first_wait_s=0.05).get("jobs/a/input")
    assert always_down.calls >= 2

    missing = Flaky(local, failures=0)
    with pytest.raises(ObjectNotFound):
        PatientStorage(missing, patience_s=60, sleep=waits.append).get("jobs/b/input")
    assert missing.calls == 1


def test_the_app_signs_links_for_megasr_s3_public_url(tmp_path, s3_endpoint):
    from urllib.parse import urlparse

    from service.config import Settings
    from service.jobsystem.services import build_services

    settings = Settings(
        redis_url="redis://127.0.0.1:1/0",
        storage_url="s3://megasr/app-links",
        home=tmp_path,
        s3_endpoint_url=s3_endpoint,
        s3_public_url="http://files.example.test:9000",
        s3_addressing_style="path",
    )
    url = build_services(settings).storage.presigned_url("jobs/z/output.png", expires_s=60)
    assert urlparse(url).netloc == "files.example.test:9000"
    assert urlparse(url).path == "/megasr/app-links/jobs/z/output.png"  # path-style addressing


def test_each_store_resolves_its_credentials_when_it_is_made(s3_endpoint, monkeypatch):
    """boto3's default session keeps the first credentials it resolved; a store made after the
    environment changed must sign with the new ones (the soak's own SeaweedFS has its own key)."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).list_buckets()  # the default session resolves megasr-test
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone-else")
    storage = S3Storage("megasr", endpoint_url=s3_endpoint)
    assert storage.client._request_signer._credentials.access_key == "someone-else"
