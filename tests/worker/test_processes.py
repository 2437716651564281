"""Real `megasr worker` processes: SIGKILL mid-job → another worker finishes it, once; SIGTERM drains."""

from __future__ import annotations

import signal
import time
import urllib.request

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.harness.processes import start_worker, wait_ready
from tests.service.helpers import make_settings, submit, wait_for


@pytest.fixture()
def setup(tmp_path, db_url, tiny_weights):
    # A database of its own (db_url): the workers' sweeper repairs every job record it finds in it.
    settings = make_settings(tmp_path, db_url)
    with TestClient(create_app(settings)) as client:
        yield settings, client, tiny_weights, tmp_path
    # any worker left behind is killed by the test itself


def test_sigkill_mid_job_is_finished_by_another_worker_once(setup):
    settings, client, weights, tmp_path = setup
    first, first_port = start_worker(settings, weights, tmp_path / "worker1.log")
    second = None
    try:
        wait_ready(first, first_port)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{first_port}/metrics", timeout=5).read().decode()
        assert "megasr_worker_ready 1.0" in metrics
        job_id = submit(client, steps=40, seed=2).json()["id"]  # ~2 s: the kill lands mid-job
        running = wait_for(client, job_id, lambda j: j["status"] == "running" and j["progress"] > 0, timeout=120)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        killed_at = time.monotonic()
        second, second_port = start_worker(settings, weights, tmp_path / "worker2.log")

        def moved_on(job: dict) -> bool:  # queued again, or already taken by the second worker
            return job["status"] != "running" or job["started_at"] != running["started_at"]

        requeued = wait_for(client, job_id, moved_on, timeout=60)
        assert time.monotonic() - killed_at < 60 and requeued["status"] in ("queued", "running", "succeeded")
        done = wait_for(client, job_id, lambda j: j["status"] in ("succeeded", "failed", "canceled"), timeout=240)
        assert done["status"] == "succeeded", done
        record = client.app.state.services.jobs.get(job_id)
        assert record.attempts == 2  # the killed attempt and the one that finished; never a third
        assert client.get(done["result_url"]).status_code == 200
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def test_sigterm_finishes_the_current_job_then_exits(setup):
    settings, client, weights, tmp_path = setup
    worker, port = start_worker(settings, weights, tmp_path / "worker.log")
    try:
        wait_ready(worker, port)
        running = submit(client, steps=40, seed=3).json()["id"]  # ~2 s: SIGTERM lands mid-job
        waiting = submit(client, steps=2, seed=4).json()["id"]
        wait_for(client, running, lambda j: j["status"] == "running" and j["progress"] > 0, timeout=120)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=120) == 0
        assert client.get(f"/v1/jobs/{running}").json()["status"] == "succeeded"
        assert client.get(f"/v1/jobs/{waiting}").json()["status"] == "queued"  # not taken
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=10)
