"""Kubernetes manifests, checked offline: schemas, GPUs, probes, grace, security, KEDA, settings."""

from __future__ import annotations

import kubernetes_validate
import pytest

from service.config import Settings
from service.contracts import DEFAULT_QUEUE
from tests.deploy.manifests import OVERLAYS, find, workers

CUSTOM_KINDS = {"ScaledObject", "ServiceMonitor"}


def test_there_are_a_generic_and_cloud_overlays():
    assert "gpu-pool" in OVERLAYS and {"gke", "eks"} & set(OVERLAYS)


def test_every_builtin_object_validates_strictly(rendered):
    _, docs = rendered
    version = kubernetes_validate.latest_version()
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_catches_typos():
    broken = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"selector": {"a": "b"}, "portz": [{"port": 80}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def pod_spec(docs, name: str) -> dict:
    (deployment,) = find(docs, "Deployment", name)
    return deployment["spec"]["template"]["spec"]


def config(docs) -> dict:
    (configmap,) = find(docs, "ConfigMap", "megasr-config")
    return configmap["data"]


def worker_pod_specs(docs) -> list[tuple[str, dict]]:
    """(name, pod spec) of every worker Deployment: megasr-worker and each model's (test_models.py)."""
    found = [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in workers(docs)]
    assert found
    return found


def test_worker_runs_on_the_gpu_pool(rendered):
    overlay, docs = rendered
    for name, spec in worker_pod_specs(docs):
        (worker,) = spec["containers"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1, name
        assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"]), name
        assert spec.get("nodeSelector"), f"{overlay}: {name} must select the GPU pool"


def test_worker_probes_grace_and_weights(rendered):
    _, docs = rendered
    for _, spec in worker_pod_specs(docs):
        (worker,) = spec["containers"]
        startup = worker["startupProbe"]
        assert startup["httpGet"]["path"] == "/readyz"
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # time to load weights
        assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert spec["terminationGracePeriodSeconds"] > int(config(docs)["MEGASR_JOB_TIMEOUT_S"])
        (init,) = spec["initContainers"]
        assert init["command"][-1] == "worker.fetch_weights"
        assert any(m["mountPath"] == "/weights" for m in init["volumeMounts"])
    assert config(docs)["MEGASR_WEIGHTS"] == "/weights"


def test_api_probes_scaling_and_disruption(rendered):
    _, docs = rendered
    (api,) = pod_spec(docs, "megasr-api")["containers"]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "command" not in api and "args" not in api  # the image's service.api_server, with its connection limits
    assert api["resources"]["requests"] and api["resources"]["limits"]
    (hpa,) = find(docs, "HorizontalPodAutoscaler", "megasr-api")
    assert hpa["spec"]["minReplicas"] >= 2
    assert find(docs, "PodDisruptionBudget", "megasr-api")
    assert find(docs, "Service", "megasr-api")


def test_pods_run_as_non_root_with_read_only_roots(rendered):
    _, docs = rendered
    for kind in ("Deployment", "StatefulSet"):
        for workload in find(docs, kind):
            spec = workload["spec"]["template"]["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["securityContext"]["runAsUser"] != 0
            for container in spec["containers"] + spec.get("initContainers", []):
                context = container["securityContext"]
                assert context["allowPrivilegeEscalation"] is False
                assert context["readOnlyRootFilesystem"] is True
                assert context["capabilities"]["drop"] == ["ALL"]


def test_keda_scales_workers_on_the_queue_the_code_uses(rendered):
    """Every worker Deployment has one ScaledObject on a Redis list of the queue the code uses; which
    list belongs to which model (Settings.queue_for) is test_models.py's pairing check."""
    _, docs = rendered
    scaled_objects = find(docs, "ScaledObject")
    targets = sorted(s["spec"]["scaleTargetRef"]["name"] for s in scaled_objects)
    assert targets == sorted(d["metadata"]["name"] for d in workers(docs))
    queue = config(docs)["MEGASR_QUEUE_NAME"]
    assert queue == DEFAULT_QUEUE
    for scaled in scaled_objects:
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        spec = scaled["spec"]
        assert spec["minReplicaCount"] >= 0 and spec["maxReplicaCount"] >= max(1, spec["minReplicaCount"])
        trigger = spec["triggers"][0]
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["listName"] == f"rq:queue:{queue}" or trigger["metadata"]["listName"].startswith(
            f"rq:queue:{queue}-"
        )
        assert int(trigger["metadata"]["listLength"]) >= 1 and trigger["metadata"]["address"]
        assert (
            spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
            >= 300
        )


def test_scale_to_zero_never_drops_a_running_job(rendered):
    """Only with the scale-to-zero component: a running job has left the queue list, so a second
    trigger on the fleet's running jobs keeps its worker; without it the fleet floor is one worker."""
    overlay, docs = rendered
    for scaled in find(docs, "ScaledObject"):
        spec = scaled["spec"]
        if spec["minReplicaCount"] >= 1:
            assert len(spec["triggers"]) == 1, overlay
            continue
        assert overlay == "gpu-pool-scale-to-zero"
        queue, running = spec["triggers"]
        assert queue["metadata"]["activationListLength"] == "0"  # the first queued job wakes a worker
        assert running["type"] == "prometheus"
        assert "megasr_jobs_running" in running["metadata"]["query"]  # the API's gauge (service/prometheus.py)
        assert float(running["metadata"]["activationThreshold"]) < 1 <= float(running["metadata"]["threshold"])
        assert spec["cooldownPeriod"] >= 600


def test_cloud_overlays_pick_one_gpu_nodes(rendered):
    """A worker uses one GPU: the cloud overlays select 1-GPU machine shapes only."""
    one_gpu = {
        "g6.xlarge",
        "g6.2xlarge",
        "g5.xlarge",
        "g5.2xlarge",
        "g6e.xlarge",
        "g6e.2xlarge",
        "p5.4xlarge",
        "g2-standard-8",
        "g2-standard-12",
        "a2-ultragpu-1g",
        "a3-highgpu-1g",
    }
    overlay, docs = rendered
    if overlay not in ("eks", "gke"):
        return
    affinity = pod_spec(docs, "megasr-worker")["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    (term,) = affinity["nodeSelectorTerms"]
    (expression,) = term["matchExpressions"]
    assert expression["key"] == "node.kubernetes.io/instance-type" and expression["operator"] == "In"
    assert expression["values"] and set(expression["values"]) <= one_gpu


def test_images_come_from_one_kustomize_entry(rendered):
    """Every container image is the base kustomization's images: entry (one place to pin a release)."""
    import yaml

    from tests.deploy.manifests import ROOT

    entries = {
        e["newName"]: e["newTag"]
        for e in yaml.safe_load((ROOT / "k8s/components/images/kustomization.yaml").read_text())["images"]
    }
    _, docs = rendered
    megasr_images = [
        c["image"]
        for d in docs
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"] + d["spec"]["template"]["spec"].get("initContainers", [])
        if "megasr" in c["image"]
    ]
    assert megasr_images
    for image in megasr_images:
        name, _, tag = image.rpartition(":")
        assert entries.get(name) == tag, image


def test_dcgm_exporter_is_scraped_where_the_component_is_used(rendered):
    overlay, docs = rendered
    monitors = {m["metadata"]["name"]: m for m in find(docs, "ServiceMonitor")}
    if overlay != "gpu-pool-scale-to-zero":
        assert "megasr-dcgm-exporter" not in monitors
        return
    dcgm = monitors["megasr-dcgm-exporter"]
    assert dcgm["spec"]["namespaceSelector"]["matchNames"] == ["gpu-operator"]
    assert dcgm["spec"]["endpoints"][0]["port"] == "gpu-metrics"


def test_service_monitors_point_at_metrics_ports(rendered):
    _, docs = rendered
    monitors = [m for m in find(docs, "ServiceMonitor") if m["metadata"]["name"] != "megasr-dcgm-exporter"]
    assert {m["metadata"]["name"] for m in monitors} == {"megasr-api", "megasr-worker"}
    services = find(docs, "Service")
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selector = monitor["spec"]["selector"]["matchLabels"]
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        matching = [s for s in services if selector.items() <= s["metadata"].get("labels", {}).items()]
        assert any(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in matching)


def test_metrics_need_the_metrics_key_and_prometheus_sends_it(rendered):
    """The API reads MEGASR_METRICS_KEY from the Secret; the API's ServiceMonitor sends the same key as a bearer."""
    _, docs = rendered
    (api,) = pod_spec(docs, "megasr-api")["containers"]
    (env,) = [e for e in api["env"] if e["name"] == "MEGASR_METRICS_KEY"]
    ref = env["valueFrom"]["secretKeyRef"]
    assert not ref.get("optional", False)
    (monitor,) = find(docs, "ServiceMonitor", "megasr-api")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["authorization"]["type"] == "Bearer"
    assert endpoint["authorization"]["credentials"] == {"name": ref["name"], "key": ref["key"]}


def test_api_trusts_forwarded_headers_only_from_named_proxies(rendered):
    """FORWARDED_ALLOW_IPS is a list of addresses/networks, never "*" (clients would pick their own address)."""
    import ipaddress

    _, docs = rendered
    trusted = config(docs)["FORWARDED_ALLOW_IPS"]
    networks = [ipaddress.ip_network(entry.strip()) for entry in trusted.split(",")]
    assert networks and all(network.prefixlen >= 8 for network in networks)


def test_redis_persists_with_aof(rendered):
    _, docs = rendered
    (redis,) = find(docs, "StatefulSet", "megasr-redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert "--appendonly" in container["args"] and "yes" in container["args"]
    assert redis["spec"]["volumeClaimTemplates"]
    assert config(docs)["MEGASR_REDIS_URL"].startswith("redis://megasr-redis:")


def test_network_policies_default_deny(rendered):
    _, docs = rendered
    policies = find(docs, "NetworkPolicy")
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"] for p in policies)


def test_settings_names_are_the_ones_the_code_reads(rendered):
    _, docs = rendered
    known = {f"MEGASR_{name.upper()}" for name in Settings.model_fields} | {"MEGASR_WEIGHTS_SOURCE"}
    known |= {"FORWARDED_ALLOW_IPS"}  # uvicorn's own: the trusted proxies of the API image
    used = set(config(docs))
    for kind in ("Deployment",):
        for workload in find(docs, kind):
            spec = workload["spec"]["template"]["spec"]
            for container in spec["containers"] + spec.get("initContainers", []):
                used |= {e["name"] for e in container.get("env", []) if e["name"].startswith("MEGASR_")}
    unknown = sorted(used - known)
    assert not unknown, f"settings the code does not read: {unknown}"


def test_secrets_are_references_not_values(rendered):
    _, docs = rendered
    assert not find(docs, "Secret")  # created out of band, never committed
    data = config(docs)
    assert not [k for k in data if "SECRET" in k or k.endswith("_KEYS")]


def test_gke_reaches_cloud_storage_with_hmac_keys(rendered):
    """boto3 speaks to Cloud Storage's S3 API with an HMAC key (it cannot use Workload Identity):
    region "auto", SigV4 (always, in service/storage.py), the key from the Secret."""
    overlay, docs = rendered
    if overlay != "gke":
        return
    data = config(docs)
    assert data["MEGASR_S3_ENDPOINT_URL"] == "https://storage.googleapis.com"
    assert data["MEGASR_S3_REGION"] == "auto"
    (worker,) = pod_spec(docs, "megasr-worker")["containers"]
    names = {e["name"]: e for e in worker["env"]}
    assert names["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["key"] == "aws-access-key-id"


def test_training_job_is_a_consistent_multi_node_launch():
    """k8s/training: an Indexed Job of N pods × G GPUs whose accelerate launch agrees with it
    (machines, processes, rank = completion index, rank 0's stable name), validated strictly."""
    from tests.deploy.manifests import render_path

    docs = render_path("k8s/training")
    version = kubernetes_validate.latest_version()
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    (job,) = find(docs, "Job", "megasr-train")
    (service,) = find(docs, "Service", "megasr-train")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"] >= 2
    pod = spec["template"]["spec"]
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    (train,) = pod["containers"]
    env = {e["name"]: e["value"] for e in train["env"]}
    assert int(env["NUM_MACHINES"]) == spec["completions"]
    assert int(env["GPUS_PER_MACHINE"]) == train["resources"]["limits"]["nvidia.com/gpu"]
    assert env["MAIN_ADDRESS"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    command = " ".join(train["args"])
    for flag in (
        '--num_machines "$NUM_MACHINES"',
        '--machine_rank "$JOB_COMPLETION_INDEX"',
        '--main_process_ip "$MAIN_ADDRESS"',
        "-m megasr_core.cli train megasr",
    ):
        assert flag in command
    assert train["image"].startswith("ghcr.io/") and "megasr-worker" in train["image"]
    assert train["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
