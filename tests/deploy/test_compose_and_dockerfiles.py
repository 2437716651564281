"""docker-compose.yml and the Dockerfiles, checked without a Docker engine."""

from __future__ import annotations

import re

import yaml

from service.config import Settings
from tests.deploy.compose import project
from tests.deploy.manifests import ROOT

KNOWN = {f"MEGASR_{name.upper()}" for name in Settings.model_fields} | {
    "MEGASR_BUCKET",
    "MEGASR_WEIGHTS_DIR",
    "MEGASR_API_PORT",
    "MEGASR_WEIGHTS_SOURCE",
    "MEGASR_S3_PORT",
}
# docker-compose.models.yml's own: each model's weights folder and GPU (test_models.py)
KNOWN |= {"MEGASR_SEESR_WEIGHTS_DIR", "MEGASR_SEESR_TURBO_WEIGHTS_DIR", "MEGASR_SEESR_GPU", "MEGASR_SEESR_TURBO_GPU"}


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_health_and_volumes():
    spec = compose()
    services = spec["services"]
    assert {"redis", "minio", "create-bucket", "api", "worker"} <= set(services)
    for name in ("redis", "minio", "api", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert "--appendonly" in services["redis"]["command"]
    assert set(spec["volumes"]) >= {"redis-data", "minio-data"}
    assert any(v.startswith("redis-data:") for v in services["redis"]["volumes"])
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"


def test_compose_result_links_open_outside_the_compose_network():
    """Presigned links are signed for an address clients reach (the published MinIO port), not
    for http://minio:9000, which only resolves inside the compose network."""
    services = compose()["services"]
    assert any(str(port).endswith(":9000") for port in services["minio"]["ports"])
    api = services["api"]["environment"]
    assert api["MEGASR_S3_ENDPOINT_URL"] == "http://minio:9000"
    public = api["MEGASR_S3_PUBLIC_URL"]
    assert "minio" not in public and public.endswith(":9000}")
    assert api["MEGASR_S3_ADDRESSING_STYLE"] == "path"


def test_compose_worker_reserves_a_gpu_and_drains():
    worker = compose()["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
    grace = int(worker["stop_grace_period"].rstrip("s"))
    assert grace > Settings.model_fields["job_timeout_s"].default
    assert any(v.endswith(":/weights:ro") for v in worker["volumes"])


def test_compose_and_env_example_use_settings_the_code_reads():
    text = "".join(
        (ROOT / name).read_text() for name in ("docker-compose.yml", "docker-compose.models.yml", ".env.example")
    )
    names = set(re.findall(r"\bMEGASR_[A-Z0-9_]+", text))
    assert names and not sorted(names - KNOWN)
    env_example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert "change-me" in env_example["MEGASR_API_KEYS"]  # placeholders, not real secrets


def dockerfiles() -> dict[str, str]:
    return {p.name: p.read_text() for p in (ROOT / "docker").glob("*.Dockerfile")}


def test_dockerfiles_are_pinned_non_root_and_secret_free():
    files = dockerfiles()
    assert {"api.Dockerfile", "worker.Dockerfile"} <= set(files)
    for name, text in files.items():
        bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
        assert len(bases) >= 2, f"{name}: multi-stage build expected"
        for base in bases:
            assert ":" in base and not base.endswith(":latest"), f"{name}: unpinned base {base}"
            assert re.search(r":\S*\d", base), f"{name}: base tag without a version: {base}"
        users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{name}: must end as a non-root USER"
        for line in re.findall(r"^(?:ENV|ARG)\s+(.+)$", text, flags=re.M):
            assert not re.search(r"(KEY|SECRET|PASSWORD|TOKEN)\w*=", line, flags=re.I), f"{name}: secret in {line}"
        assert "HEALTHCHECK" in text


def test_api_image_has_no_torch():
    text = dockerfiles()["api.Dockerfile"]
    lines = (ROOT / "docker" / "requirements-api.txt").read_text().lower().splitlines()
    packages = [line.split(">")[0].split("=")[0].strip() for line in lines if line and not line.startswith("#")]
    assert packages and not [p for p in packages if p in ("torch", "diffusers", "transformers")]
    assert "--no-deps" in text
    assert re.search(r'^CMD \["python", "-m", "service.api_server"', text, flags=re.M)


def test_every_api_launch_path_runs_the_api_server_command():
    """The connection limits (header and keep-alive deadlines, the connection cap) live in service.api_server's
    uvicorn options: Compose runs the image's command as is (tests/service/test_connections.py runs it)."""
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.models.yml"]):
        api = project([ROOT / name for name in files])["services"]["api"]
        assert "command" not in api and "entrypoint" not in api, files


def test_api_image_trusts_forwarded_headers_only_from_loopback():
    """The API image no longer believes X-Forwarded-For from anyone: uvicorn reads FORWARDED_ALLOW_IPS=127.0.0.1."""
    text = dockerfiles()["api.Dockerfile"]
    assert "--forwarded-allow-ips" not in text and '"*"' not in text
    assert re.search(r"^ENV\s.*\bFORWARDED_ALLOW_IPS=127\.0\.0\.1\b", text, flags=re.M)
    assert "proxy_headers=True" in (ROOT / "service" / "api_server.py").read_text()  # the image's command
    api = compose()["services"]["api"]
    assert api["environment"]["FORWARDED_ALLOW_IPS"] == "${FORWARDED_ALLOW_IPS:-127.0.0.1}"


def test_env_example_sets_the_edge_limits_and_a_metrics_key():
    env_example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert "change-me" in env_example["MEGASR_METRICS_KEY"]
    assert int(env_example["MEGASR_RATE_LIMIT_BURST"]) >= 1 and int(env_example["MEGASR_AUTH_FAILURES_PER_MINUTE"]) >= 1


def test_dockerignore_keeps_secrets_and_weights_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".env", ".git", ".venv", "*.safetensors", "weights/"):
        assert entry in ignored
