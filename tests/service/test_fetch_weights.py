"""The init container's weight download from S3 (SeaweedFS), idempotent and checked."""

from __future__ import annotations

import boto3
import pytest

from worker.fetch_weights import fetch


def test_fetch_a_weights_directory_from_s3(s3_endpoint, tiny_weights, tmp_path):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    files = [p for p in tiny_weights.rglob("*") if p.is_file()]
    for path in files:
        client.upload_file(str(path), "megasr", f"weights/tiny/{path.relative_to(tiny_weights)}")
    dest = tmp_path / "weights"
    assert fetch("s3://megasr/weights/tiny", dest, endpoint_url=s3_endpoint) == len(files)
    for path in files:
        assert (dest / path.relative_to(tiny_weights)).read_bytes() == path.read_bytes()
    assert fetch("s3://megasr/weights/tiny", dest, endpoint_url=s3_endpoint) == 0  # already there
    with pytest.raises(FileNotFoundError, match="missing"):
        fetch("s3://megasr/weights/tiny/unet", tmp_path / "partial", endpoint_url=s3_endpoint)
    with pytest.raises(ValueError, match="s3://"):
        fetch("/local/path", dest)
