"""Rendered manifests: every overlay through `kubectl kustomize`, parsed once per session."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = sorted(p.name for p in (ROOT / "k8s" / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


def render(overlay: str) -> list[dict]:
    return render_path(f"k8s/overlays/{overlay}")


def render_path(directory: str) -> list[dict]:
    """The objects ``kubectl kustomize`` renders from a kustomization directory of the repository."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is required to render the kustomize overlays (it is on the machine image)")
    result = subprocess.run([kubectl, "kustomize", str(ROOT / directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="session", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
