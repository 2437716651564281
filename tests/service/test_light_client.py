"""megasr-client: light (no torch, nothing of the server), its models agree with the API's, it
installs alone from client/, and it retries what is safe to retry, against the real app."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from megasr_client import Job, JobPage, MegaSRClient, Model, RateLimitedError
from megasr_client.models import ImageSize, JobError, JobMetrics, JobParams, JobUrls, ModelInfo
from service import contracts
from service.app import create_app
from tests.harness.live_server import live_server
from tests.harness.valkey import fresh_database_url
from tests.service.helpers import make_settings, png, run_worker

ROOT = Path(__file__).resolve().parents[2]  # tests/service/ → the repository
#: each client model and the server model whose answers it reads
MIRRORS: list[tuple[type[BaseModel], type[BaseModel]]] = [
    (Job, contracts.JobView),
    (JobPage, contracts.JobList),
    (Model, contracts.ServedModel),
    (ModelInfo, contracts.ModelInfo),
    (JobParams, contracts.UpscaleParams),
    (JobMetrics, contracts.JobMetrics),
    (JobUrls, contracts.JobUrls),
    (ImageSize, contracts.ImageSize),
    (JobError, contracts.JobError),
]


def test_importing_the_client_loads_nothing_heavy():
    code = (
        "import sys, megasr_client; "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'diffusers', 'transformers', 'megasr_core', 'service', 'worker', 'fastapi', 'redis'}); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(("ours", "theirs"), MIRRORS, ids=[ours.__name__ for ours, _ in MIRRORS])
def test_every_client_field_is_one_the_api_answers(ours, theirs):
    """The same names (no field the server never sends), and every field the server has is read."""
    assert set(ours.model_fields) == set(theirs.model_fields) | set(theirs.model_computed_fields)


def test_a_served_view_parses_into_the_clients_job(client):
    answer = client.post("/v1/upscale", files={"image": ("a.png", png())}, data={"steps": "1"}).json()
    job = Job.model_validate({**answer, "a_field_of_a_newer_server": 1})  # unknown fields are ignored
    assert job.id == answer["id"] and job.urls.get == f"/v1/jobs/{job.id}" and job.params.steps == 1


def test_a_failed_submission_is_retried_and_answers_the_same_job(tmp_path, db_url):
    """A connection lost after the server took the job: the retry carries the same Idempotency-Key."""
    lost = []

    def lose_first_answer(response) -> None:
        if response.request.method == "POST" and not lost:
            lost.append(response.request.headers["idempotency-key"])
            raise httpx.ReadError("connection reset", request=response.request)

    with TestClient(create_app(make_settings(tmp_path, db_url))) as http:
        http.event_hooks["response"].append(lose_first_answer)
        job = MegaSRClient(http=http, max_retry_wait_s=0.01).submit(png(), steps=1)
        assert lost and lost[0].startswith("megasr-client-")
        listed = http.get("/v1/jobs").json()["jobs"]
    assert [j["id"] for j in listed] == [job.id]  # one job, not two


def test_a_full_queue_is_waited_out_and_a_rate_limit_gives_up_after_the_retries(tmp_path, redis_url):
    settings = make_settings(tmp_path, fresh_database_url(redis_url), max_queued_per_tenant=1)
    with TestClient(create_app(settings)) as http:
        requests = []
        http.event_hooks["request"].append(lambda request: requests.append(request.url.path))
        client = MegaSRClient(http=http, max_retries=20, max_retry_wait_s=0.1)
        first = client.submit(png(), steps=1)
        releaser = threading.Timer(0.5, lambda: http.delete(f"/v1/jobs/{first.id}"))
        releaser.start()
        second = client.submit(png(), steps=1)  # 429 queue_quota until the first one is canceled
        releaser.join()
        assert second.id != first.id and requests.count("/v1/upscale") > 2

    limited = make_settings(tmp_path, fresh_database_url(redis_url), rate_limit_per_minute=1, rate_limit_burst=1)
    with TestClient(create_app(limited)) as http:
        requests = []
        http.event_hooks["request"].append(lambda request: requests.append(request.url.path))
        client = MegaSRClient(http=http, max_retries=2, max_retry_wait_s=0.01)
        client.submit(png(), steps=1)
        with pytest.raises(RateLimitedError) as refused:
            client.submit(png(), steps=1)
        assert refused.value.code == "rate_limited" and requests.count("/v1/upscale") == 1 + 3


@pytest.mark.slow
def test_the_client_installs_alone_and_runs_the_readme_example(tmp_path, redis_url, tiny_pipeline):
    """pip install ./client into a clean venv: httpx and pydantic, no torch; then the README's example."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # built from a copy: setuptools writes build/ and *.egg-info beside the sources it builds
    source = shutil.copytree(
        ROOT / "client", tmp_path / "client-source", ignore=shutil.ignore_patterns("build", "*.egg-info")
    )
    subprocess.run([*pip, str(source)], check=True, timeout=600)
    installed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True)
    names = {line.split("==")[0].lower() for line in installed.stdout.splitlines()}
    assert "megasr-client" in names and not names & {"torch", "megasr", "diffusers", "fastapi"}, names
    (tmp_path / "photo.png").write_bytes(png(16, 12))
    example = textwrap.dedent(
        """
        import sys
        from megasr_client import MegaSRClient

        with MegaSRClient(sys.argv[1], api_key=None) as client:
            job = client.submit("photo.png", scale=2, steps=1)
            job = client.wait(job.id, on_progress=lambda j: print(j.status.value, f"{j.progress:.0%}"))
            client.download(job.id, "photo_x2.png")
            print("done", job.status.value, job.output.width, job.metrics.predict_s is not None)
        """
    )
    settings = make_settings(tmp_path, redis_url)
    with live_server(create_app(settings)) as base:
        run = subprocess.Popen(
            [python, "-c", example, base], cwd=tmp_path, stdout=subprocess.PIPE, text=True, env={**os.environ}
        )
        deadline = time.monotonic() + 60
        queue = TestClient(create_app(settings)).app.state.services.queue
        while queue.depth() == 0 and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.05)
        run_worker(settings, tiny_pipeline)
        out, _ = run.communicate(timeout=120)
    assert run.returncode == 0 and out.splitlines()[-1] == "done succeeded 32 True", out
    assert (tmp_path / "photo_x2.png").is_file()
