"""A Hugging Face Hub cache written as huggingface_hub writes it, for the offline weights tests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

EXTRA = "training/optimizer.bin"  # in the repo, not part of the serving layout


def populate_hf_cache(hub_cache: Path, repo_id: str, weights: Path, commit: str, refs: list[str]) -> Path:
    """Put ``weights`` into ``hub_cache`` as huggingface_hub stores a snapshot; returns the snapshot."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    files = {p.relative_to(weights).as_posix(): p.read_bytes() for p in weights.rglob("*") if p.is_file()}
    files[EXTRA] = b"not serving weights"
    for relative, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot
