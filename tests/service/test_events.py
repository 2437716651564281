"""GET /v1/jobs/{id}/events: Server-Sent Events of a job's progress, then its final state."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx

from megasr_client.client import _sse_messages
from service import events
from service.app import create_app
from service.contracts import ImageSize, JobStatus, JobView, UpscaleParams
from service.jobsystem.store import JobStore
from tests.harness.live_server import live_server
from tests.service.helpers import KEY_A, KEY_B, make_settings, run_worker, submit

A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


def read_events(base: str, job_id: str, into: list, first: threading.Event) -> None:
    with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", headers=A, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for message in _sse_messages(response.iter_lines()):
            into.append(message)
            first.set()


def test_progress_then_done_over_a_real_server(tmp_path, db_url, tiny_pipeline):
    settings = make_settings(tmp_path, db_url, api_keys=f"a:{KEY_A},b:{KEY_B}", allow_anonymous=False)
    app = create_app(settings)
    with live_server(app) as base:
        with httpx.Client(base_url=base) as http:
            job = submit(http, headers=A, steps=3).json()
            other = http.get(f"/v1/jobs/{job['id']}/events", headers=B)
            assert other.status_code == 404 and other.json()["error"]["code"] == "job_not_found"
            assert http.get(f"/v1/jobs/{job['id']}/events").status_code == 401
        received: list[tuple[str, str]] = []
        first = threading.Event()
        reader = threading.Thread(target=read_events, args=(base, job["id"], received, first))
        reader.start()
        assert first.wait(30)  # following the job before it starts
        run_worker(settings, tiny_pipeline)
        reader.join(timeout=60)
        assert not reader.is_alive()
    messages = [(name, json.loads(data)) for name, data in received if name]
    names = [name for name, _ in messages]
    assert names[0] == "progress" and names[-1] == "done" and set(names[:-1]) == {"progress"}
    assert messages[0][1]["id"] == job["id"]
    final = messages[-1][1]
    assert final["status"] == "succeeded" and final["progress"] == 1.0 and final["result_url"]
    progress = [data["progress"] for _, data in messages]
    assert progress == sorted(progress)


def view(status: JobStatus, progress: float = 0.0) -> JobView:
    return JobView(
        id="j",
        status=status,
        model="default",
        progress=progress,
        created_at="2026-01-01T00:00:00Z",
        input=ImageSize(width=8, height=8),
        params=UpscaleParams(),
    )


def collect(states: list[JobView | None], max_seconds: float = 5.0, keepalive_s: float = 15.0) -> list[str]:
    pending = list(states)

    async def load():
        return pending.pop(0) if len(pending) > 1 else pending[0]

    async def connected() -> bool:
        return False

    async def run() -> list[str]:
        return [
            chunk
            async for chunk in events.job_events(
                load, connected, max_seconds, poll_interval_s=0.01, keepalive_s=keepalive_s
            )
        ]

    return asyncio.run(run())


def test_an_event_per_change_only():
    chunks = collect(
        [
            view(JobStatus.queued),
            view(JobStatus.queued),
            view(JobStatus.running, 0.5),
            view(JobStatus.running, 0.5),
            view(JobStatus.succeeded, 1.0),
        ]
    )
    assert [c.split("\n")[0] for c in chunks] == ["event: progress", "event: progress", "event: done"]
    assert json.loads(chunks[1].split("data: ")[1])["progress"] == 0.5


def test_keepalives_and_the_time_bound():
    chunks = collect([view(JobStatus.running, 0.1)], max_seconds=0.3, keepalive_s=0.05)
    assert chunks[0].startswith("event: progress")
    assert ": keep-alive\n\n" in chunks[1:]
    assert not any(c.startswith("event: done") for c in chunks)  # cut at the bound: the client reconnects


def test_a_vanished_job_ends_with_an_error_event():
    chunks = collect([view(JobStatus.queued), None])
    assert chunks[-1].startswith("event: error")
    assert json.loads(chunks[-1].split("data: ")[1])["error"]["code"] == "job_not_found"


def test_a_finished_job_answers_done_at_once(tmp_path, db_url):
    from fastapi.testclient import TestClient

    settings = make_settings(tmp_path, db_url)
    with TestClient(create_app(settings)) as client:
        job = submit(client, steps=1).json()
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 200
        response = client.get(f"/v1/jobs/{job['id']}/events")
        assert response.status_code == 200
        messages = list(_sse_messages(iter(response.text.splitlines())))
        assert [name for name, _ in messages] == ["done"]
        assert json.loads(messages[0][1])["status"] == "canceled"
        assert client.get("/v1/jobs/nope/events").status_code == 404
        client.app.state.services.redis.delete(JobStore.key(job["id"]))
        assert client.get(f"/v1/jobs/{job['id']}/events").status_code == 404
        streams = client.app.state.event_streams  # the finished stream gave its slot back
        assert streams.slots.open_count() == 0 and streams.poller.followed == 0


def test_events_carry_the_view_that_get_answers(tmp_path, db_url):
    """The shared poller reads the queue position and the cancel flag as GET /v1/jobs/{id} does."""
    settings = make_settings(tmp_path, db_url)
    app = create_app(settings)
    services = app.state.services
    with live_server(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        submit(http, steps=1)
        job = submit(http, steps=1).json()
        url = f"/v1/jobs/{job['id']}"
        with http.stream("GET", f"{url}/events") as response:
            messages = _sse_messages(response.iter_lines())
            first = json.loads(next(messages)[1])
            assert first["queue_position"] == 1 and first == http.get(url).json()
            running = services.jobs.get(job["id"]).model_copy(update={"status": JobStatus.running, "progress": 0.25})
            with services.redis.pipeline() as pipe:  # started, and its cancel asked for: one transaction
                pipe.set(JobStore.key(job["id"]), running.model_dump_json())
                pipe.set(JobStore.cancel_key(job["id"]), 1)
                pipe.execute()
            seen = json.loads(next(messages)[1])
            while seen["status"] != "running":
                seen = json.loads(next(messages)[1])
            assert seen["cancel_requested"] is True and seen["queue_position"] is None
            assert seen == http.get(url).json()
