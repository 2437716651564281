"""/metrics (running jobs, build info, process, the in-process worker's series), /readyz with an
in-process worker (megasr serve), and the worker's own /healthz heartbeat."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from service import local_workers
from service.local_workers import LocalWorker, WorkerState
from service.prometheus import package_version
from tests.harness.ports import free_port
from tests.service.helpers import make_settings, submit
from worker.status_server import WorkerMetrics


def sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture()
def settings(tmp_path, db_url):
    return make_settings(tmp_path, db_url)


@pytest.fixture()
def embedded(settings):
    """A LocalWorker registered for the app's Redis and queue, as ``megasr serve``'s worker thread is."""
    worker = local_workers.register(LocalWorker(redis_url=settings.redis_url, queue=settings.queue_name))
    yield worker
    local_workers.unregister(worker)


def test_running_gauge_build_info_and_process_metrics(client):
    assert sample(client.get("/metrics").text, "megasr_jobs_running") == 0
    job = submit(client, steps=1).json()
    client.app.state.services.jobs.start(job["id"], "w:1")
    text = client.get("/metrics").text
    assert sample(text, "megasr_jobs_running") == 1
    assert f'megasr_build_info{{version="{package_version()}"}} 1.0' in text
    assert package_version() != "unknown"
    assert sample(text, "process_resident_memory_bytes") > 0
    assert "python_info{" in text


def test_readiness_follows_the_in_process_worker(client, embedded):
    assert client.get("/readyz").json()["checks"]["worker"] == "loading"
    assert client.get("/readyz").status_code == 503
    loop = threading.Thread(target=threading.Event().wait, args=(10,), daemon=True)
    loop.start()
    embedded.thread, embedded.state = loop, WorkerState.ready
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": "ok", "storage": "ok", "worker": "ok"}
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    embedded.thread = dead  # the job loop's thread died without a word
    gone = client.get("/readyz")
    assert gone.status_code == 503 and gone.json()["checks"]["worker"] == "stopped: the worker thread died"


def test_readyz_ignores_workers_of_other_queues(client, settings):
    other = local_workers.register(LocalWorker(redis_url=settings.redis_url, queue="another-queue"))
    try:
        assert client.get("/readyz").status_code == 200
    finally:
        local_workers.unregister(other)


def test_in_process_worker_metrics_on_the_api_metrics(client, embedded):
    metrics = WorkerMetrics()
    metrics.batch_size.observe(3)
    embedded.registry = metrics.registry
    text = client.get("/metrics").text
    assert sample(text, "megasr_worker_batch_size_count") == 1
    assert "megasr_http_requests_total" in text


def test_weights_that_fail_to_load_keep_readyz_503(client, settings, tmp_path):
    from worker.embedded import start_worker_thread

    thread = start_worker_thread(settings, tmp_path / "no-weights-here", device="cpu")
    try:
        thread.join(timeout=120)
        assert not thread.is_alive()
        answer = client.get("/readyz")
        assert answer.status_code == 503
        assert answer.json()["checks"]["worker"].startswith("failed: could not load the model")
    finally:
        for worker in local_workers.serving(settings.redis_url, settings.queue_name):
            local_workers.unregister(worker)


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_worker_healthz_turns_503_when_the_heartbeat_stops(settings):
    from service.jobsystem.services import build_services
    from worker.runtime import WorkerRuntime

    runtime = WorkerRuntime(
        services=build_services(settings), pipeline=None, metrics=WorkerMetrics(heartbeat_stale_s=0.5)
    )
    port = free_port()
    server = runtime.metrics.serve("127.0.0.1", port)
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        assert get(url) == (200, {"status": "ok"})  # loading: no beat yet
        runtime.start_background(lease_interval_s=0.05, reap_interval_s=60)
        time.sleep(0.8)
        assert get(url)[0] == 200  # beating
        runtime.stop()  # as when the job loop ends
        time.sleep(0.8)
        status, body = get(url)
        assert status == 503 and body["status"] == "dead" and body["reason"].startswith("no heartbeat for")
    finally:
        runtime.stop()
        server.shutdown()


def test_worker_healthz_turns_503_when_the_job_loop_thread_dies():
    metrics = WorkerMetrics()
    port = free_port()
    server = metrics.serve("127.0.0.1", port)
    try:
        done = threading.Event()
        loop = threading.Thread(target=done.wait)
        loop.start()
        metrics.watch(loop)
        metrics.beat()
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        done.set()
        loop.join()
        assert get(f"http://127.0.0.1:{port}/healthz") == (
            503,
            {"status": "dead", "reason": "the job loop has stopped"},
        )
    finally:
        server.shutdown()
