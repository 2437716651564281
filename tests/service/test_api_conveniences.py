"""What client authors used to Replicate's predictions API expect, over real HTTP: `metrics`,
`urls`, `Prefer: wait=N`, seeds a JavaScript number holds."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.prefer_wait import MAX_WAIT_S, preferred_wait
from tests.harness.live_server import live_server
from tests.service.helpers import KEY_A, KEY_B, make_settings, png, run_worker, submit


def test_metrics_and_urls_follow_the_job(tmp_path, redis_url, tiny_pipeline):
    settings = make_settings(tmp_path, redis_url, public_url="https://sr.example.com/base")
    with TestClient(create_app(settings), base_url="https://sr.example.com") as client:
        queued = submit(client, png(8, 8), steps=1).json()
        base = f"https://sr.example.com/base/v1/jobs/{queued['id']}"
        assert queued["urls"] == {
            "get": base,
            "cancel": base,
            "stream": f"{base}/events",
            "input": f"{base}/input",
            "result": None,
        }
        assert queued["metrics"] == {"queue_s": None, "predict_s": None}
        run_worker(settings, tiny_pipeline)
        done = client.get(f"/v1/jobs/{queued['id']}").json()
        assert done["status"] == "succeeded" and done["urls"]["result"] == f"{base}/result" == done["result_url"]
        metrics = done["metrics"]
        assert metrics["queue_s"] >= 0 and metrics["predict_s"] > 0
        record = client.app.state.services.jobs.get(queued["id"])
        assert metrics["predict_s"] == round((record.finished_at - record.started_at).total_seconds(), 3)
        assert client.get(done["urls"]["result"].removeprefix("https://sr.example.com/base")).status_code == 200
        # the input as uploaded, for a before/after view later; only its owner gets it
        uploaded = client.get(done["urls"]["input"].removeprefix("https://sr.example.com/base"))
        assert uploaded.status_code == 200 and uploaded.content == png(8, 8)
        assert uploaded.headers["content-type"] == "image/png"


def test_urls_are_root_relative_without_a_public_url(client):
    job = submit(client).json()
    assert job["urls"]["get"] == f"/v1/jobs/{job['id']}" and job["urls"]["stream"] == f"/v1/jobs/{job['id']}/events"


def test_the_input_of_another_tenant_or_a_gone_one_is_a_404(tmp_path, redis_url):
    settings = make_settings(tmp_path, redis_url, api_keys=f"a:{KEY_A},b:{KEY_B}", allow_anonymous=False)
    with TestClient(create_app(settings)) as client:
        job = submit(client, headers={"Authorization": f"Bearer {KEY_A}"}).json()
        path = f"/v1/jobs/{job['id']}/input"
        assert client.get(path, headers={"Authorization": f"Bearer {KEY_B}"}).status_code == 404
        assert client.get(path).status_code == 401
        services = client.app.state.services
        services.storage.delete(services.jobs.get(job["id"]).input_key)
        gone = client.get(path, headers={"Authorization": f"Bearer {KEY_A}"})
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "input_gone"


def test_seeds_stay_within_what_javascript_holds(client):
    assert submit(client, seed=2**53 - 1).status_code == 202
    refused = submit(client, seed=2**53)
    assert refused.status_code == 422 and refused.json()["error"]["message"].startswith("seed:")
    drawn = [submit(client).json()["params"]["seed"] for _ in range(20)]
    assert all(0 <= seed <= 2**53 - 1 for seed in drawn) and len(set(drawn)) == 20


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], None),
        (["wait=5"], 5),
        (["respond-async, wait=10"], 10),
        (['wait="7"'], 7),
        (["wait"], MAX_WAIT_S),
        (["wait=3600"], MAX_WAIT_S),
        (["wait=soon"], None),
        (["return=minimal", "Wait=2"], 2),
    ],
)
def test_the_wait_preference_is_read_as_rfc_7240_says(headers, expected):
    assert preferred_wait(headers) == expected


def test_prefer_wait_answers_the_finished_job_or_the_usual_202(tmp_path, redis_url, tiny_pipeline):
    settings = make_settings(tmp_path, redis_url)
    with live_server(create_app(settings)) as base, httpx.Client(base_url=base, timeout=60) as http:
        # nobody works the queue: the wait runs out and the answer is the usual 202
        started = time.monotonic()
        late = submit(http, png(8, 8), headers={"Prefer": "wait=1"}, steps=1)
        assert late.status_code == 202 and late.json()["status"] == "queued"
        assert 0.9 <= time.monotonic() - started < 10 and "preference-applied" not in late.headers
        run_worker(settings, tiny_pipeline)

        answer: dict = {}

        def post() -> None:
            answer["response"] = submit(http, png(8, 8), headers={"Prefer": "wait=30"}, steps=1)

        poster = threading.Thread(target=post)
        poster.start()
        queue = TestClient(create_app(settings)).app.state.services.queue
        deadline = time.monotonic() + 30
        while queue.depth() == 0 and time.monotonic() < deadline:  # the job is queued, its POST waiting
            time.sleep(0.05)
        run_worker(settings, tiny_pipeline)
        poster.join(timeout=60)
        response = answer["response"]
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "succeeded" and response.headers["preference-applied"] == "wait=30"
        assert response.headers["location"].endswith(response.json()["id"])
