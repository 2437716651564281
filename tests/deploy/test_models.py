"""Several models (issue 23): every model the API routes to has its own workers, on its own queue.

The pairing, as the code defines it (``service.config.Settings``): the API routes to
``served_models()`` (MEGASR_MODELS, else MEGASR_MODEL, else "default"); a worker consumes
``queue_for(worker_model)`` (MEGASR_MODEL, else "default"), the Redis list ``rq:queue:<queue>``
that its KEDA ScaledObject must watch. Checked on every Kubernetes overlay, on the model
components over every overlay, and on docker-compose.yml with and without
docker-compose.models.yml; each check is also shown to fail on a pairing broken on purpose.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.config import Settings
from tests.deploy import compose
from tests.deploy.manifests import (
    OVERLAYS,
    ROOT,
    container,
    effective_env,
    find,
    labels_match,
    render,
    render_path,
    workers,
)

TWO_MODELS = "gpu-pool-two-models"
MODEL_COMPONENTS = sorted(
    p.name for p in (ROOT / "k8s" / "components").glob("model-*") if (p / "kustomization.yaml").is_file()
)
COMPOSE_BASE = ROOT / "docker-compose.yml"
COMPOSE_MODELS = ROOT / "docker-compose.models.yml"


def one(items: list, what: str):
    """The one item (an AssertionError otherwise, which the broken-pairing tests expect)."""
    assert len(items) == 1, f"{len(items)} {what}"
    return items[0]


def settings(env: dict) -> Settings:
    """The settings a process with this environment reads, as far as models and queues go."""
    return Settings(
        model=env.get("MEGASR_MODEL"),
        models=env.get("MEGASR_MODELS"),
        queue_name=env.get("MEGASR_QUEUE_NAME") or "megasr",
    )


# --- Kubernetes -------------------------------------------------------------------------------


def check_k8s_models(docs: list[dict]) -> dict[str, tuple[dict, dict]]:
    """model → (worker Deployment, its ScaledObject); fails unless every model the API routes to
    has exactly one worker Deployment, no Deployment serves another model, and each ScaledObject
    watches the Redis list of its Deployment's model."""
    api = one(find(docs, "Deployment", "megasr-api"), "API Deployments")
    api_settings = settings(effective_env(docs, container(api, "api")))
    fleets: dict[str, dict] = {}
    queues: dict[str, str] = {}
    for deployment in workers(docs):
        env = effective_env(docs, container(deployment, "worker"))
        worker = settings(env)
        model = worker.worker_model
        assert model not in fleets, (
            f"{fleets.get(model, {}).get('metadata', {}).get('name')} and "
            f"{deployment['metadata']['name']} both serve {model}"
        )
        fleets[model] = deployment
        queues[model] = worker.queue_for(model)
        assert queues[model] == api_settings.queue_for(model), f"{model}: the API and its workers disagree on its queue"
        # its own weights: the init container copies them into the pod's /weights
        init = one(deployment["spec"]["template"]["spec"]["initContainers"], "init containers")
        assert effective_env(docs, init)["MEGASR_WEIGHTS_SOURCE"], deployment["metadata"]["name"]
    assert sorted(fleets) == sorted(api_settings.served_models()), (
        f"the API routes to {api_settings.served_models()}, workers serve {sorted(fleets)}"
    )
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in find(docs, "ScaledObject")}
    assert len(scaled) == len(find(docs, "ScaledObject")), "two ScaledObjects scale one Deployment"
    pairs = {}
    for model, deployment in fleets.items():
        name = deployment["metadata"]["name"]
        assert name in scaled, f"{name} ({model}) has no ScaledObject"
        trigger = one([t for t in scaled[name]["spec"]["triggers"] if t["type"] == "redis"], f"{name} Redis triggers")
        assert trigger["metadata"]["listName"] == f"rq:queue:{queues[model]}", (
            f"{name} serves {model} (queue {queues[model]}) but KEDA watches {trigger['metadata']['listName']}"
        )
        pairs[model] = (deployment, scaled.pop(name))
    assert not scaled, f"ScaledObjects without a worker Deployment: {sorted(scaled)}"
    return pairs


def check_selectors_apart(docs: list[dict]) -> None:
    """No workload's selector takes in another's pods; each PDB covers one workload's pods."""
    workloads = [w for kind in ("Deployment", "StatefulSet") for w in find(docs, kind)]
    for workload in workloads:
        selector = workload["spec"]["selector"]
        assert labels_match(selector, workload["spec"]["template"]["metadata"]["labels"])
        for other in workloads:
            if other is not workload:
                assert not labels_match(selector, other["spec"]["template"]["metadata"]["labels"]), (
                    f"{workload['metadata']['name']}'s selector takes in {other['metadata']['name']}'s pods"
                )
    for budget in find(docs, "PodDisruptionBudget"):
        covered = [
            w["metadata"]["name"]
            for w in workloads
            if labels_match(budget["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(covered) == 1, f"PDB {budget['metadata']['name']} covers {covered}"


def check_worker_network(docs: list[dict]) -> None:
    """Every worker pod may reach Redis (the Redis policy admits it), is reached on its metrics port
    only from the monitoring namespace, is restricted in no egress (S3 storage, the Hub), and is
    behind the metrics Service that the worker ServiceMonitor scrapes."""
    policies = find(docs, "NetworkPolicy")
    redis = one(find(docs, "StatefulSet", "megasr-redis"), "Redis StatefulSets")
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    redis_policies = [
        p for p in policies if labels_match(p["spec"]["podSelector"], redis_labels) and p["spec"].get("ingress")
    ]
    monitors = [m for m in find(docs, "ServiceMonitor") if m["metadata"]["name"] == "megasr-worker"]
    for deployment in workers(docs):
        name, labels = deployment["metadata"]["name"], deployment["spec"]["template"]["metadata"]["labels"]
        assert any(
            labels_match(peer["podSelector"], labels)
            for p in redis_policies
            for rule in p["spec"]["ingress"]
            for peer in rule.get("from", [])
            if "podSelector" in peer and "namespaceSelector" not in peer
        ), f"{name} cannot reach Redis"
        selecting = [p for p in policies if labels_match(p["spec"]["podSelector"], labels)]
        assert all("Egress" not in p["spec"]["policyTypes"] for p in selecting), f"{name}: egress restricted"
        metrics = [p for p in selecting if p["spec"].get("ingress")]
        assert metrics, f"{name}: no NetworkPolicy admits scrapes of its metrics port"
        assert all(port["port"] == 9100 for p in metrics for rule in p["spec"]["ingress"] for port in rule["ports"]), (
            name
        )
        assert all(
            peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
            for p in metrics
            for rule in p["spec"]["ingress"]
            for peer in rule["from"]
        ), name
        services = [
            s
            for s in find(docs, "Service")
            if s["spec"].get("selector")
            and labels_match(s["spec"]["selector"], labels)
            and "metrics" in {port["name"] for port in s["spec"]["ports"]}
        ]
        assert any(labels_match(m["spec"]["selector"], s["metadata"]["labels"]) for m in monitors for s in services), (
            f"{name}'s /metrics is not scraped"
        )


def test_every_overlay_pairs_models_workers_and_queues(rendered):
    _, docs = rendered
    check_k8s_models(docs)
    check_selectors_apart(docs)
    check_worker_network(docs)


@pytest.fixture(scope="module")
def two_models() -> list[dict]:
    return render(TWO_MODELS)


def test_two_models_overlay_serves_seesr_and_seesr_turbo(two_models):
    pairs = check_k8s_models(two_models)
    api = effective_env(two_models, container(find(two_models, "Deployment", "megasr-api")[0], "api"))
    assert settings(api).served_models() == ["seesr", "seesr-turbo"]  # seesr: the default of requests
    assert sorted(pairs) == ["seesr", "seesr-turbo"]
    for model, (deployment, scaled) in pairs.items():
        assert deployment["metadata"]["name"] == f"megasr-worker-{model}"
        assert deployment["metadata"]["labels"]["megasr/model"] == model
        assert effective_env(two_models, container(deployment, "worker"))["MEGASR_MODEL"] == model
        (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
        assert effective_env(two_models, init)["MEGASR_WEIGHTS_SOURCE"] == f"s3://megasr-weights/{model}-v1"
        assert scaled["spec"]["triggers"][0]["metadata"]["listName"] == f"rq:queue:megasr-{model}"
    assert not find(two_models, "Deployment", "megasr-worker")  # the model "default" is not served
    # megasr-worker's scaling, copied: the same floor, ceiling and slow scale-down
    for _, scaled in pairs.values():
        assert scaled["spec"]["minReplicaCount"] == 1 and scaled["spec"]["maxReplicaCount"] == 8


@pytest.mark.parametrize(
    ("breakage", "check"),
    [
        ("queue", check_k8s_models),
        ("model", check_k8s_models),
        ("api", check_k8s_models),
        ("scaler", check_k8s_models),
        ("selector", check_selectors_apart),
        ("network", check_worker_network),
    ],
)
def test_the_checks_catch_a_broken_pairing(two_models, breakage, check):
    docs = copy.deepcopy(two_models)
    seesr, turbo = (find(docs, "Deployment", f"megasr-worker-{m}")[0] for m in ("seesr", "seesr-turbo"))
    if breakage == "queue":  # KEDA watching the default model's list
        (scaled,) = find(docs, "ScaledObject", "megasr-worker-seesr-turbo")
        scaled["spec"]["triggers"][0]["metadata"]["listName"] = "rq:queue:megasr"
    elif breakage == "model":  # both fleets on one model
        next(e for e in container(turbo, "worker")["env"] if e["name"] == "MEGASR_MODEL")["value"] = "seesr"
    elif breakage == "api":  # a fleet for a model the API does not route to
        find(docs, "ConfigMap", "megasr-config")[0]["data"]["MEGASR_MODELS"] = "seesr"
    elif breakage == "scaler":  # one ScaledObject gone
        docs.remove(find(docs, "ScaledObject", "megasr-worker-seesr")[0])
    elif breakage == "selector":  # one fleet's selector taking in the other's pods
        seesr["spec"]["selector"]["matchLabels"] = {"app.kubernetes.io/component": "worker"}
    elif breakage == "network":  # pods the Redis and metrics policies do not take in
        del turbo["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"]
    for other in {check_k8s_models, check_selectors_apart, check_worker_network} - {check}:
        other(docs)  # the breakage is this check's alone
    with pytest.raises(AssertionError):
        check(docs)


def _without(spec: dict, container_env: dict[str, list[str]]) -> dict:
    """A pod spec less the named env entries of the named containers."""
    spec = copy.deepcopy(spec)
    for c in spec["containers"] + spec.get("initContainers", []):
        c["env"] = [e for e in c.get("env", []) if e["name"] not in container_env.get(c["name"], [])]
    return spec


@pytest.mark.parametrize("component", MODEL_COMPONENTS)
@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o != TWO_MODELS])
def test_model_components_add_a_fleet_to_any_overlay(tmp_path, overlay, component):
    """A model component over any overlay: its workers are megasr-worker's pods (GPU pool, cloud
    node affinity, service account, scale-to-zero) with only their model, weights and queue changed."""
    model = component.removeprefix("model-")
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [
                    os.path.relpath(ROOT / "k8s" / "overlays" / overlay, tmp_path)
                ],  # kustomize: relative only
                "components": [os.path.relpath(ROOT / "k8s" / "components" / component, tmp_path)],
                "configMapGenerator": [
                    {"name": "megasr-config", "behavior": "merge", "literals": [f"MEGASR_MODELS=default,{model}"]}
                ],
            }
        )
    )
    docs = render_path(str(tmp_path))
    pairs = check_k8s_models(docs)
    check_selectors_apart(docs)
    check_worker_network(docs)
    assert sorted(pairs) == sorted(["default", model])
    (base, base_scaled), (clone, scaled) = pairs["default"], pairs[model]
    added = {"worker": ["MEGASR_MODEL"], "fetch-weights": ["MEGASR_WEIGHTS_SOURCE"]}
    assert _without(clone["spec"]["template"]["spec"], added) == base["spec"]["template"]["spec"]
    assert clone["spec"]["strategy"] == base["spec"]["strategy"]
    assert clone["metadata"]["namespace"] == base["metadata"]["namespace"]
    mine, theirs = copy.deepcopy(scaled["spec"]), copy.deepcopy(base_scaled["spec"])
    for spec in (mine, theirs):
        spec["scaleTargetRef"].pop("name")
        spec["triggers"][0]["metadata"].pop("listName")
    assert mine == theirs


def test_model_components_are_one_template():
    """Every components/model-<name> is model-seesr-turbo with another name and weights: a copy
    made for a new model cannot drift from the mechanics tested above."""

    def normalized(component: str) -> list:
        model = component.removeprefix("model-")
        # a model name (Settings) that also fits the label app.kubernetes.io/name: megasr-worker-<model>
        assert re.fullmatch(r"[a-z0-9]([a-z0-9.-]{0,47}[a-z0-9])?", model), model
        text = "\n---\n".join(
            (ROOT / "k8s" / "components" / component / name).read_text()
            for name in ("kustomization.yaml", "worker.yaml")
        )
        docs = list(yaml.safe_load_all(re.sub(rf"\b{re.escape(model)}\b", "MODEL", text)))
        for doc in docs:
            if doc.get("kind") == "Deployment":
                source = doc["metadata"]["annotations"]["megasr/weights-source"]
                assert re.fullmatch(r"(s3|hf)://\S+", source), source
                doc["metadata"]["annotations"]["megasr/weights-source"] = "SOURCE"
        return docs

    assert "model-seesr-turbo" in MODEL_COMPONENTS and len(MODEL_COMPONENTS) >= 2
    template = normalized("model-seesr-turbo")
    for component in MODEL_COMPONENTS:
        assert normalized(component) == template, component


# --- Docker Compose ---------------------------------------------------------------------------


def env_example() -> dict[str, str]:
    return dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )


def service_env(service: dict, dotenv: dict[str, str]) -> dict:
    """A service's environment: its env_file (.env, here .env.example), then ``environment``."""
    env = dict(dotenv) if ".env" in str(service.get("env_file", "")) else {}
    env.update({k: v for k, v in service.get("environment", {}).items() if v is not None})
    return env


def compose_workers(model: dict) -> dict[str, dict]:
    return {
        name: s
        for name, s in model["services"].items()
        if "worker.Dockerfile" in str(s.get("build", {}).get("dockerfile", ""))
    }


def check_compose_models(model: dict, dotenv: dict[str, str]) -> dict[str, dict]:
    """model → worker service; fails unless every model the API routes to has exactly one worker on
    the same queue, no worker serves another model, and the workers hold distinct GPUs and weights."""
    api_settings = settings(service_env(model["services"]["api"], dotenv))
    fleets: dict[str, dict] = {}
    gpus: list[str] = []
    weights: list[str] = []
    for name, service in compose_workers(model).items():
        worker = settings(service_env(service, dotenv))
        assert worker.worker_model not in fleets, f"two workers serve {worker.worker_model}"
        fleets[worker.worker_model] = service
        assert worker.queue_for(worker.worker_model) == api_settings.queue_for(worker.worker_model), name
        device = one(service["deploy"]["resources"]["reservations"]["devices"], f"{name} GPU requests")
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert ("count" in device) != ("device_ids" in device), f"{name}: count or device_ids, not both"
        gpus.extend(device.get("device_ids", [f"first {device.get('count')}"]))
        mount = one([v for v in service["volumes"] if compose._volume_target(v) == "/weights"], f"{name} weights")
        assert mount.endswith(":/weights:ro"), name
        weights.append(mount.split(":")[0])
    assert sorted(fleets) == sorted(api_settings.served_models()), (
        f"the API routes to {api_settings.served_models()}, workers serve {sorted(fleets)}"
    )
    assert len(set(gpus)) == len(gpus), f"workers share a GPU: {gpus}"
    assert len(set(weights)) == len(weights), f"workers share weights: {weights}"
    return fleets


def test_compose_base_alone_is_one_model():
    """docker-compose.yml alone: unchanged, one worker serving the model "default" on queue megasr."""
    model = compose.project([COMPOSE_BASE])
    assert "MEGASR_MODELS" not in model["services"]["api"]["environment"]
    fleets = check_compose_models(model, env_example())
    assert list(fleets) == ["default"]
    (device,) = fleets["default"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == 1
    assert settings(service_env(fleets["default"], env_example())).queue_for("default") == "megasr"


def test_compose_models_override_serves_seesr_and_seesr_turbo():
    model = compose.project([COMPOSE_BASE, COMPOSE_MODELS])
    assert "worker" not in model["services"]  # the "default" worker: only with --profile single-model
    fleets = check_compose_models(model, env_example())
    assert list(fleets) == ["seesr", "seesr-turbo"]
    assert settings(service_env(model["services"]["api"], env_example())).default_model == "seesr"
    base = compose.project([COMPOSE_BASE])["services"]["worker"]
    for index, (name, service) in enumerate(fleets.items()):
        assert service["environment"]["MEGASR_MODEL"] == name
        assert settings(service_env(service, env_example())).queue_for(name) == f"megasr-{name}"
        (mount,) = [v for v in service["volumes"] if compose._volume_target(v) == "/weights"]
        assert mount == f"./weights/{name}:/weights:ro"  # each model's own folder (megasr.json: its family)
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] == [str(index)]
        # the rest is the base worker's: image, grace period, health check, settings, volumes, dependencies
        for key in ("build", "image", "env_file", "stop_grace_period", "healthcheck", "restart", "depends_on"):
            assert service[key] == base[key], key
        assert {k: v for k, v in service["environment"].items() if k != "MEGASR_MODEL"} == base["environment"]
        assert [v for v in service["volumes"] if not v.endswith(":/weights:ro")] == [
            v for v in base["volumes"] if not v.endswith(":/weights:ro")
        ]
    with_profile = compose.project([COMPOSE_BASE, COMPOSE_MODELS], profiles=("single-model",))
    assert "worker" in with_profile["services"]


def test_compose_gpus_and_weights_follow_the_env_file():
    model = compose.project(
        [COMPOSE_BASE, COMPOSE_MODELS],
        env={"MEGASR_SEESR_GPU": "2", "MEGASR_SEESR_TURBO_GPU": "3", "MEGASR_SEESR_TURBO_WEIGHTS_DIR": "/srv/turbo"},
    )
    workers_ = compose_workers(model)
    assert workers_["worker-seesr"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["2"]
    assert workers_["worker-seesr-turbo"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["3"]
    assert "/srv/turbo:/weights:ro" in workers_["worker-seesr-turbo"]["volumes"]


@pytest.mark.parametrize("breakage", ["model", "api", "same-device", "weights", "devices"])
def test_the_compose_check_catches_a_broken_pairing(breakage):
    model = compose.project([COMPOSE_BASE, COMPOSE_MODELS])
    services = model["services"]
    turbo = services["worker-seesr-turbo"]
    if breakage == "model":
        turbo["environment"]["MEGASR_MODEL"] = "seesr"
    elif breakage == "api":
        services["api"]["environment"]["MEGASR_MODELS"] = "seesr"
    elif breakage == "same-device":
        turbo["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] = ["0"]
    elif breakage == "weights":
        turbo["volumes"] = [v.replace("seesr-turbo", "seesr") for v in turbo["volumes"]]
    elif breakage == "devices":  # the base's count: 1 added to the model's device (no !override)
        turbo["deploy"]["resources"]["reservations"]["devices"].insert(
            0, {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
        )
    with pytest.raises(AssertionError):
        check_compose_models(model, env_example())


def test_without_the_override_tag_the_base_gpu_request_stays(tmp_path):
    """Compose appends sequences: without !override the base worker's `count: 1` (GPU 0) would stay
    next to the model's device_ids (as Compose's own `config` shows, see the last test)."""
    shutil.copy(COMPOSE_BASE, tmp_path / COMPOSE_BASE.name)
    (tmp_path / "models.yml").write_text(COMPOSE_MODELS.read_text().replace("devices: !override", "devices:"))
    model = compose.project([tmp_path / COMPOSE_BASE.name, tmp_path / "models.yml"])
    devices = model["services"]["worker-seesr"]["deploy"]["resources"]["reservations"]["devices"]
    assert [(d.get("count"), d.get("device_ids")) for d in devices] == [(1, None), (None, ["0"])]
    with pytest.raises(AssertionError):
        check_compose_models(model, env_example())


def _compose_v2() -> list[str] | None:
    """A Docker Compose v2 command (`docker compose` or a v2 `docker-compose`), if there is one."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        result = subprocess.run([*command, "version", "--short"], capture_output=True, text=True, timeout=30)
        if result.returncode == 0 and result.stdout.strip().lstrip("v").startswith("2."):
            return command
    return None


@pytest.mark.skipif(_compose_v2() is None, reason="no Docker Compose v2 here: the merge is compose.py's alone")
def test_compose_py_merges_as_docker_compose_does(tmp_path):
    """compose.py against Compose's own `config` (no engine needed) on the files of this repository."""
    for name in ("docker-compose.yml", "docker-compose.models.yml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    (tmp_path / "docker").mkdir()
    for name in ("api.Dockerfile", "worker.Dockerfile"):
        shutil.copy(ROOT / "docker" / name, tmp_path / "docker" / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEGASR_", "AWS_", "COMPOSE_"))}
    for files, profiles in (
        (["docker-compose.yml"], ()),
        (["docker-compose.yml", "docker-compose.models.yml"], ()),
        (["docker-compose.yml", "docker-compose.models.yml"], ("single-model",)),
    ):
        command = [
            *_compose_v2(),
            *(a for f in files for a in ("-f", f)),
            *(a for p in profiles for a in ("--profile", p)),
            "config",
            "--format",
            "json",
        ]
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, result.stderr
        theirs = json.loads(result.stdout)["services"]
        ours = compose.project([tmp_path / f for f in files], env=env_example(), profiles=profiles)["services"]
        assert sorted(theirs) == sorted(ours), files
        for name, service in ours.items():
            other = theirs[name]
            assert {k: str(v) for k, v in service.get("environment", {}).items()} == {
                k: v for k, v in other.get("environment", {}).items() if k in service.get("environment", {})
            }
            assert {(Path(v.split(":")[0]).name, compose._volume_target(v)) for v in service.get("volumes", [])} == {
                (Path(v["source"]).name, v["target"]) for v in other.get("volumes", [])
            }, name
            assert service.get("deploy", {}).get("resources") == other.get("deploy", {}).get("resources"), name
            assert {k: v["condition"] for k, v in service.get("depends_on", {}).items()} == {
                k: v["condition"] for k, v in other.get("depends_on", {}).items()
            }, name
