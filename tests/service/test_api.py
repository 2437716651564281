"""The HTTP API end to end: real Valkey, real storage (local and SeaweedFS S3), the real worker task."""

from __future__ import annotations

import base64
import io
import threading
import time
import urllib.request
import uuid

from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.jobsystem.services import build_services
from tests.harness.ports import free_port
from tests.service.helpers import KEY_A, KEY_B, make_settings, png, run_worker, submit
from worker.runtime import install_runtime


def test_multipart_flow_with_local_storage(client, settings, tiny_pipeline):
    response = submit(client, steps=2, seed=1)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["queue_position"] == 0
    assert response.headers["location"].endswith(f"/v1/jobs/{job['id']}")
    assert job["input"] == {"width": 24, "height": 16}

    run_worker(settings, tiny_pipeline)
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and done["progress"] == 1.0
    assert done["output"] == {"width": 96, "height": 64}
    assert done["started_at"] and done["finished_at"]
    result = client.get(done["result_url"])
    assert result.status_code == 200 and result.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(result.content)).size == (96, 64)


def test_json_flow_with_s3_redirects_to_a_presigned_url(tmp_path, redis_url, s3_endpoint, tiny_pipeline):
    settings = make_settings(
        tmp_path, redis_url, storage_url=f"s3://megasr/api-{uuid.uuid4().hex[:6]}", s3_endpoint_url=s3_endpoint
    )
    with TestClient(create_app(settings)) as client:
        body = {
            "image": "data:image/png;base64," + base64.b64encode(png(20, 20)).decode(),
            "steps": 2,
            "scale": 2,
            "output_format": "webp",
        }
        response = client.post("/v1/upscale", json=body)
        assert response.status_code == 202, response.text
        run_worker(settings, tiny_pipeline)
        job = client.get(response.headers["location"]).json()
        assert job["status"] == "succeeded"
        redirect = client.get(job["result_url"], follow_redirects=False)
        assert redirect.status_code == 307
        with urllib.request.urlopen(redirect.headers["location"], timeout=10) as fetched:
            image = Image.open(io.BytesIO(fetched.read()))
        assert image.size == (40, 40) and image.format == "WEBP"


def test_auth_and_tenant_isolation(tmp_path, redis_url):
    settings = make_settings(tmp_path, redis_url, api_keys=f"alpha:{KEY_A},beta:{KEY_B}")
    with TestClient(create_app(settings)) as client:
        assert submit(client).status_code == 401
        wrong = submit(client, headers={"Authorization": "Bearer nope-nope-nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
        mine = submit(client, headers={"Authorization": f"Bearer {KEY_A}"})
        assert mine.status_code == 202
        job_id = mine.json()["id"]
        assert client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 200
        theirs = client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY_B}"})
        unknown = client.get(f"/v1/jobs/{uuid.uuid4().hex}", headers={"Authorization": f"Bearer {KEY_B}"})
        assert theirs.status_code == unknown.status_code == 404
        assert theirs.json()["error"]["code"] == unknown.json()["error"]["code"] == "job_not_found"
        assert client.delete(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY_B}"}).status_code == 404


def test_idempotency_key_returns_the_same_job(client, settings):
    headers = {"Idempotency-Key": f"order-{uuid.uuid4().hex}"}
    first = submit(client, headers=headers)
    second = submit(client, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert second.headers.get("idempotent-replayed") == "true"
    services = build_services(settings)
    assert services.queue.depth() == 1


def test_cancel_a_queued_job_at_once(client, settings, tiny_pipeline):
    job_id = submit(client).json()["id"]
    response = client.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    run_worker(settings, tiny_pipeline)  # nothing runs it
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 409


def test_cancel_a_running_job_within_a_step(client, settings, tiny_pipeline):
    from worker.tasks import upscale

    job_id = submit(client, steps=200).json()["id"]
    install_runtime(settings, tiny_pipeline)
    thread = threading.Thread(target=upscale, args=(job_id,))
    thread.start()
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{job_id}").json()["progress"] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    response = client.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    thread.join(timeout=60)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "canceled" and job["progress"] < 0.5


def test_health_ready_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": "ok", "storage": "ok"}
    spec = client.get("/openapi.json").json()
    assert "/v1/upscale" in spec["paths"] and "/v1/jobs/{job_id}" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_not_ready_when_storage_is_down(tmp_path, redis_url):
    settings = make_settings(
        tmp_path, redis_url, storage_url="s3://megasr", s3_endpoint_url=f"http://127.0.0.1:{free_port()}"
    )
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["storage"].startswith("unreachable")
        down = submit(client)
        assert down.status_code == 503 and down.json()["error"]["code"] == "storage_unavailable"


def test_redis_down_is_503(tmp_path):
    settings = make_settings(tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(settings)) as client:
        response = submit(client)
        assert response.status_code == 503 and response.json()["error"]["code"] == "queue_unavailable"
        assert client.get("/readyz").status_code == 503


def test_metrics_are_exposed_and_parseable(client, settings, tiny_pipeline):
    from prometheus_client.parser import text_string_to_metric_families

    def finished_counts() -> dict[str, float]:
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        return {
            s.labels["status"]: s.value for s in families["megasr_jobs_finished"].samples if s.name.endswith("_total")
        }

    before = finished_counts()  # a counter across the whole Valkey: compare with itself, not with a constant
    submit(client, steps=1)
    client.get("/v1/jobs/nope")
    run_worker(settings, tiny_pipeline)
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {(s.labels["route"], s.labels["status"]) for s in families["megasr_http_requests"].samples}
    assert ("/v1/upscale", "202") in requests and ("/v1/jobs/{job_id}", "404") in requests
    assert "megasr_http_request_duration_seconds" in families
    depth = [s for s in families["megasr_queue_depth"].samples if s.labels["queue"] == settings.queue_name]
    assert depth and depth[0].value == 0
    after = finished_counts()
    assert after.get("succeeded", 0) - before.get("succeeded", 0) == 1
    assert all(after.get(k, 0) == before.get(k, 0) for k in ("failed", "canceled"))


def test_results_are_deleted_after_their_ttl(tmp_path, redis_url, tiny_pipeline):
    from service.jobsystem.reaper import delete_expired_results

    settings = make_settings(tmp_path, redis_url, result_ttl_s=60)
    with TestClient(create_app(settings)) as client:
        job_id = submit(client, steps=1).json()["id"]
        run_worker(settings, tiny_pipeline)
        services = client.app.state.services
        record = services.jobs.get(job_id)
        assert services.storage.exists(record.output_key) and services.storage.exists(record.input_key)
        assert 0 < services.redis.ttl(services.jobs.key(job_id)) <= 60
        assert job_id not in services.jobs.due_for_deletion()
        services.redis.zadd("megasr:expiry", {job_id: 0})  # pretend the TTL has passed
        assert delete_expired_results(services) >= 1
        assert not services.storage.exists(record.output_key) and not services.storage.exists(record.input_key)


def test_worker_errors_are_classified():
    from rq.timeouts import JobTimeoutException

    from service.storage import StorageUnavailable
    from worker.errors import classify

    assert classify(StorageUnavailable("down")) == "transient"
    assert classify(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")) == "out_of_memory"
    assert classify(RuntimeError("CUDA error: an illegal memory access was encountered")) == "fatal"
    assert classify(JobTimeoutException("too slow")) == "timeout"
    assert classify(KeyError("x")) == "internal_error"
