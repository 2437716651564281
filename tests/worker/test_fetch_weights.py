"""The init container's weight download from S3 (SeaweedFS), idempotent and checked."""

from __future__ import annotations

import boto3
import pytest
from tqdm import tqdm

from worker.fetch_weights import fetch


def test_fetch_a_weights_directory_from_s3(s3_endpoint, tiny_weights, tmp_path, capsys):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    files = [p for p in tiny_weights.rglob("*") if p.is_file()]
    for path in files:
        client.upload_file(str(path), "megasr", f"weights/tiny/{path.relative_to(tiny_weights)}")
    dest = tmp_path / "weights"
    assert fetch("s3://megasr/weights/tiny", dest, endpoint_url=s3_endpoint) == len(files)
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    total = tqdm.format_sizeof(sum(p.stat().st_size for p in files), divisor=1024)  # every byte, counted
    assert bar.startswith("fetching weights: 100%") and f"{total}/{total}" in bar, bar
    for path in files:
        assert (dest / path.relative_to(tiny_weights)).read_bytes() == path.read_bytes()
    assert fetch("s3://megasr/weights/tiny", dest, endpoint_url=s3_endpoint) == 0  # already there
    with pytest.raises(FileNotFoundError, match="missing"):
        fetch("s3://megasr/weights/tiny/unet", tmp_path / "partial", endpoint_url=s3_endpoint)
    with pytest.raises(ValueError, match="s3://"):
        fetch("/local/path", dest)


def test_fetch_a_weights_directory_from_the_hub_cache_offline(tiny_weights, tmp_path, monkeypatch, capsys):
    """hf:// sources: with HF_HUB_OFFLINE the layout's files come from the Hub cache (HF_HOME)."""
    from tests.hub_cache import EXTRA, populate_hf_cache
    from worker.fetch_weights import main

    commit = "c" * 40
    populate_hf_cache(tmp_path / "hf" / "hub", "megasr-test/tiny", tiny_weights, commit, ["main", "v1"])
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = [p for p in tiny_weights.rglob("*") if p.is_file()]
    dest = tmp_path / "weights"
    assert fetch("hf://megasr-test/tiny@v1", dest) == len(files)
    assert "copying weights from the Hub cache: 100%" in capsys.readouterr().err
    for path in files:
        target = dest / path.relative_to(tiny_weights)
        assert not target.is_symlink() and target.read_bytes() == path.read_bytes()
    assert not (dest / EXTRA).exists()  # not part of the serving layout
    assert fetch(f"hf://megasr-test/tiny@{commit}", dest) == 0  # already there

    with pytest.raises(SystemExit) as exit_info:
        main(["--source", "hf://megasr-test/absent", "--dest", str(tmp_path / "absent")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "megasr-test/absent" in error and "HF_HUB_OFFLINE" in error
    with pytest.raises(ValueError, match="hf://org/name"):
        fetch("hf://no-slash", dest)
