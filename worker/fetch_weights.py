"""Fetch a MegaSR weights directory from object storage or the Hugging Face Hub (a Kubernetes
init container's job).

    python -m worker.fetch_weights --source s3://bucket/weights/megasr-v1 --dest /weights
    python -m worker.fetch_weights --source hf://org/name@v1.0 --dest /weights

S3: copies every object under the prefix. Hub: ``snapshot_download(local_dir=dest)`` of the
layout's files (``megasr_core.weights.hub``; ``HF_TOKEN`` for private or gated repos); with
``HF_HUB_OFFLINE=1`` the snapshot is copied from the Hub cache (``HF_HOME``) instead. Either way
files already present are kept (so a restarted pod on the same volume does not download again),
each file is written atomically, and the layout is checked last, so a half-copied directory never
starts a worker.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from megasr_core.weights.hub import ALLOW_PATTERNS, HubWeights, download, hub_offline, missing_parts, parse_hub_source


def fetch(source: str, dest: Path, endpoint_url: str | None = None) -> int:
    """Download ``s3://bucket/prefix`` or ``hf://org/name[@revision]`` into ``dest``; returns the
    number of files written."""
    parsed = urlparse(source)
    if parsed.scheme == "s3" and parsed.netloc:
        written = _fetch_s3(parsed.netloc, parsed.path.strip("/"), dest, endpoint_url)
    elif source.startswith("hf:") and (hub := parse_hub_source(source)) is not None:
        written = _fetch_hub(hub, dest)
    else:
        raise ValueError(f"--source must be s3://bucket/prefix or hf://org/name[@revision], got {source!r}")
    missing = missing_parts(dest)
    if missing:
        raise FileNotFoundError(f"{source} is not a complete MegaSR weights directory: missing {', '.join(missing)}")
    return written


def _fetch_s3(bucket: str, prefix: str, dest: Path, endpoint_url: str | None) -> int:
    """Every object under ``prefix`` not already in ``dest`` at its size; a bar over their bytes."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("MEGASR_S3_ENDPOINT_URL"))
    wanted: list[tuple[str, Path, int]] = []
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix) :].lstrip("/") if prefix else item["Key"]
            if not relative or relative.endswith("/"):
                continue
            target = (dest / relative).resolve()
            if not target.is_relative_to(dest.resolve()):
                raise ValueError(f"object key {item['Key']!r} escapes the destination")
            if target.is_file() and target.stat().st_size == item["Size"]:
                continue
            wanted.append((item["Key"], target, item["Size"]))
    with tqdm(
        total=sum(size for _, _, size in wanted), unit="B", unit_scale=True, unit_divisor=1024, desc="fetching weights"
    ) as bar:
        for key, target, _ in wanted:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            client.download_file(bucket, key, str(partial), Callback=bar.update)
            partial.replace(target)
    return len(wanted)


def _fetch_hub(hub: HubWeights, dest: Path) -> int:
    """Online: ``snapshot_download(local_dir=dest)``. Offline it would only return ``dest`` as it is,
    so the layout's files are copied from the cached snapshot instead."""
    if not hub_offline():
        before = _stamps(dest)
        download(hub, local_dir=dest)
        after = _stamps(dest)
        return sum(1 for name, stamp in after.items() if before.get(name) != stamp)
    from huggingface_hub.utils import filter_repo_objects

    snapshot = download(hub)
    names = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    wanted = [
        name
        for name in filter_repo_objects(names, allow_patterns=ALLOW_PATTERNS)
        if not ((dest / name).is_file() and (dest / name).stat().st_size == (snapshot / name).stat().st_size)
    ]
    for name in tqdm(wanted, unit="file", desc="copying weights from the Hub cache"):
        source, target = snapshot / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        shutil.copyfile(source, partial)  # follows the snapshot's links to the cache's blobs
        partial.replace(target)
    return len(wanted)


def _stamps(directory: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under ``directory`` (but huggingface_hub's own ``.cache``)."""
    if not directory.is_dir():
        return {}
    return {
        p.relative_to(directory).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in directory.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(directory).parts
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source",
        default=os.environ.get("MEGASR_WEIGHTS_SOURCE"),
        help="s3://bucket/prefix or hf://org/name[@revision]",
    )
    parser.add_argument("--dest", default=os.environ.get("MEGASR_WEIGHTS", "/weights"), type=Path)
    args = parser.parse_args(argv)
    if not args.source:
        parser.error("--source (or MEGASR_WEIGHTS_SOURCE) is required")
    try:
        count = fetch(args.source, args.dest)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"weights ready in {args.dest} ({count} files downloaded)")


if __name__ == "__main__":
    main()
