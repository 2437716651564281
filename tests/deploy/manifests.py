"""The repository's Kubernetes manifests rendered through `kubectl kustomize`, and what the deploy tests
look up in them (objects by kind and name, the worker Deployments, a container's effective environment)."""

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


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def labels_match(selector: dict, labels: dict) -> bool:
    """A label selector (``matchLabels``; an empty one selects every pod, as in a NetworkPolicy) or
    a Service's bare selector mapping (an empty one selects nothing) against an object's labels."""
    assert "matchExpressions" not in selector, "matchExpressions are not modelled here"
    if "matchLabels" in selector or not selector:
        return selector.get("matchLabels", {}).items() <= labels.items()
    return selector.items() <= labels.items()


def workers(docs: list[dict]) -> list[dict]:
    """The GPU worker Deployments: megasr-worker and every model component's megasr-worker-<model>."""
    return [
        d
        for d in find(docs, "Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    ]


def effective_env(docs: list[dict], container: dict) -> dict[str, str | None]:
    """The container's environment: its ConfigMaps (envFrom, later ones win), then its own ``env``
    (a value from a Secret or a field reads as None)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        (configmap,) = find(docs, "ConfigMap", source["configMapRef"]["name"])
        env.update(configmap["data"])
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value")
    return env


def container(deployment: dict, name: str) -> dict:
    (found,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found
