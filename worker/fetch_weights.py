"""Fetch a MegaSR weights directory from object storage (a Kubernetes init container's job).

    python -m worker.fetch_weights --source s3://bucket/weights/megasr-v1 --dest /weights

Copies every object under the prefix, skips files already present with the same size (so a
restarted pod on the same volume does not download again), writes each file atomically and
finishes by checking the layout, so a half-copied directory never starts a worker.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

REQUIRED = ("megasr.json", "unet", "controlnet", "vae", "text_encoder", "tokenizer", "scheduler")


def fetch(source: str, dest: Path, endpoint_url: str | None = None) -> int:
    """Download ``s3://bucket/prefix`` into ``dest``; returns the number of files written."""
    import boto3

    parsed = urlparse(source)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"--source must be s3://bucket/prefix, got {source!r}")
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    client = boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("MEGASR_S3_ENDPOINT_URL"))
    written = 0
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix):].lstrip("/") if prefix else item["Key"]
            if not relative or relative.endswith("/"):
                continue
            target = (dest / relative).resolve()
            if not target.is_relative_to(dest.resolve()):
                raise ValueError(f"object key {item['Key']!r} escapes the destination")
            if target.is_file() and target.stat().st_size == item["Size"]:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            client.download_file(bucket, item["Key"], str(partial))
            partial.replace(target)
            written += 1
    missing = [name for name in REQUIRED if not (dest / name).exists()]
    if missing:
        raise FileNotFoundError(f"{source} is not a complete MegaSR weights directory: missing {', '.join(missing)}")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=os.environ.get("MEGASR_WEIGHTS_SOURCE"), help="s3://bucket/prefix")
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
