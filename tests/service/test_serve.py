"""`megasr serve` with the embedded defaults, as a user runs it on a fresh machine."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.harness.processes import start_serve
from tests.service.helpers import png


def test_serve_embedded_end_to_end(tmp_path, tiny_weights):
    env = {**os.environ, "MEGASR_HOME": str(tmp_path / "home"), "MEGASR_WEIGHTS": str(tiny_weights)}
    for key in ("MEGASR_REDIS_URL", "MEGASR_API_KEYS", "MEGASR_STORAGE_URL"):
        env.pop(key, None)
    server, base = start_serve(env, tmp_path / "serve.log")
    try:
        # It serves the one model it loaded, named after its family, and says the weights are untrained.
        [model] = httpx.get(f"{base}/v1/models", timeout=10).json()["models"]
        assert (model["name"], model["default"], model["workers"], model["family"]) == ("megasr", True, 1, "megasr")
        assert model["trained"] is False and "tiny demo weights" in model["untrained_reason"]
        # /readyz reuses its checks for a second (probe floods), so it may still show the moment before
        # the worker announced itself; within a few seconds it lists the model as /v1/models does.
        expected = [{"name": "megasr", "family": "megasr", "trained": False, "workers": 1}]
        deadline = time.monotonic() + 10
        while (ready := httpx.get(f"{base}/readyz", timeout=10).json())["models"] != expected:
            assert time.monotonic() < deadline, ready
            time.sleep(0.3)
        assert "weights tiny are UNTRAINED" in (tmp_path / "serve.log").read_text()
        response = httpx.post(
            f"{base}/v1/upscale", files={"image": ("a.png", png(20, 12), "image/png")}, data={"steps": "2"}, timeout=30
        )
        assert response.status_code == 202, response.text
        job_url = base + response.headers["location"]  # links are root-relative without MEGASR_PUBLIC_URL
        deadline = time.monotonic() + 180
        while (job := httpx.get(job_url, timeout=10).json())["status"] not in ("succeeded", "failed", "canceled"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["status"] == "succeeded", job
        assert job["model"] == job["model_info"]["name"] == "megasr" and job["model_info"]["trained"] is False
        result = httpx.get(base + job["result_url"], timeout=30)
        assert Image.open(io.BytesIO(result.content)).size == (80, 48)
        assert (tmp_path / "home" / "valkey").is_dir() and (tmp_path / "home" / "data").is_dir()
        conf = (tmp_path / "home" / "valkey" / "valkey.conf").read_text().splitlines()
        valkey_port = int(next(line.split()[1] for line in conf if line.startswith("port ")))
    finally:
        server.terminate()
        server.wait(timeout=30)
    # The embedded Valkey went down with the server: nothing listens on its port any more.
    import socket

    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", valkey_port)) != 0


def test_serve_refuses_a_public_address_without_keys(tmp_path):
    env = {**os.environ, "MEGASR_HOME": str(tmp_path)}
    env.pop("MEGASR_API_KEYS", None)
    result = subprocess.run(
        [str(Path(sys.executable).with_name("megasr")), "serve", "--host", "0.0.0.0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "without API keys" in result.stderr


def test_serve_api_only_with_an_external_redis_queues_for_separate_workers(tmp_path, redis_url, tiny_pipeline):
    """MEGASR_REDIS_URL set: no embedded Valkey, no in-process worker; jobs wait for `megasr worker`."""
    from rq.worker import SimpleWorker

    from tests.service.helpers import make_settings
    from worker.main import make_worker
    from worker.runtime import install_runtime

    settings = make_settings(tmp_path, redis_url)
    env = {
        **os.environ,
        "MEGASR_HOME": str(tmp_path / "home"),
        "MEGASR_REDIS_URL": redis_url,
        "MEGASR_STORAGE_URL": settings.storage_url,
        "MEGASR_QUEUE_NAME": settings.queue_name,
    }
    env.pop("MEGASR_API_KEYS", None)
    server, base = start_serve(env, tmp_path / "serve.log")
    try:
        response = httpx.post(
            f"{base}/v1/upscale",
            files={"image": ("a.png", png(20, 12), "image/png")},
            data={"steps": "1", "seed": "1"},
            timeout=30,
        )
        assert response.status_code == 202, response.text
        job_url = base + response.headers["location"]  # links are root-relative without MEGASR_PUBLIC_URL
        time.sleep(3)  # an in-process worker would have started it by now
        assert httpx.get(job_url, timeout=10).json()["status"] == "queued"
        assert not (tmp_path / "home" / "valkey").exists()  # no embedded Valkey was started
        runtime = install_runtime(settings, tiny_pipeline)  # a separate worker on the same Redis,
        runtime.start_background(lease_interval_s=1)  # renewing its lease as `megasr worker` does
        try:
            connection = runtime.services.redis
            make_worker(SimpleWorker, connection, settings.queue_name).work(burst=True)  # JSON jobs, fair dequeue
        finally:
            runtime.stop()
        job = httpx.get(job_url, timeout=10).json()
        assert job["status"] == "succeeded", job
        assert httpx.get(base + job["result_url"], timeout=30).status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize(
    ("trusted", "same_bucket"), [("127.0.0.1", False), ("192.0.2.1", True)], ids=["proxy-trusted", "proxy-not-trusted"]
)
def test_serve_believes_x_forwarded_for_only_from_trusted_proxies(tmp_path, db_url, trusted, same_bucket):
    """MEGASR_FORWARDED_ALLOW_IPS: from a trusted proxy (here the loopback peer) the failed-auth limit keys on
    the forwarded client; from anyone else X-Forwarded-For is ignored, so a client cannot pick fresh addresses."""
    env = {
        **os.environ,
        "MEGASR_HOME": str(tmp_path / "home"),
        "MEGASR_REDIS_URL": db_url,
        "MEGASR_STORAGE_URL": (tmp_path / "data").as_uri(),
        "MEGASR_API_KEYS": "acme:acme-key-0123456789",
        "MEGASR_AUTH_FAILURES_PER_MINUTE": "2",
        "MEGASR_FORWARDED_ALLOW_IPS": trusted,
    }
    server, base = start_serve(env, tmp_path / "serve.log")
    try:

        def guess(client_ip: str, n: int) -> int:  # a new key prefix each time: only the client's bucket is shared
            return httpx.get(
                f"{base}/v1/jobs/x",
                timeout=10,
                headers={"Authorization": f"Bearer {n}-wrong-key-0123456789", "X-Forwarded-For": client_ip},
            ).status_code

        assert [guess("198.51.100.1", 1), guess("198.51.100.1", 2), guess("198.51.100.1", 3)] == [401, 401, 429]
        assert guess("198.51.100.2", 4) == (429 if same_bucket else 401)
    finally:
        server.terminate()
        server.wait(timeout=30)
