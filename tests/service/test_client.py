"""megasr_client.MegaSRClient against the real app: in-process (TestClient) and over TCP (uvicorn)."""

from __future__ import annotations

import io
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from megasr_client import JobStatus
from megasr_client.client import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    MegaSRClient,
    MegaSRError,
    NotFoundError,
)
from service.app import create_app
from tests.harness.live_server import live_server
from tests.service.helpers import KEY_A, KEY_B, make_settings, png, run_worker


@pytest.fixture()
def settings(tmp_path, db_url):
    return make_settings(tmp_path, db_url, api_keys=f"a:{KEY_A},b:{KEY_B}", allow_anonymous=False)


def test_submit_list_cancel_and_typed_errors(settings, tmp_path):
    with TestClient(create_app(settings)) as http:
        client = MegaSRClient(api_key=KEY_A, http=http)
        path = tmp_path / "photo.png"
        path.write_bytes(png())
        first = client.submit(path, steps=2, seed=7, output_format="webp")
        assert first.status == JobStatus.queued and first.params.seed == 7 and first.params.output_format == "webp"
        second = client.submit(png(), steps=1)
        assert client.get(second.id).id == second.id
        assert [j.id for j in client.list_jobs().jobs] == [second.id, first.id]
        page = client.list_jobs(limit=1)
        assert [j.id for j in page.jobs] == [second.id] and page.next
        assert [j.id for j in client.iter_jobs(limit=1)] == [second.id, first.id]

        assert client.cancel(first.id).status == JobStatus.canceled
        assert [j.id for j in client.list_jobs(status="canceled").jobs] == [first.id]
        assert [j.id for j in client.list_jobs(status=[JobStatus.queued, JobStatus.canceled]).jobs] == [
            second.id,
            first.id,
        ]
        with pytest.raises(ConflictError) as conflict:
            client.cancel(first.id)
        assert (conflict.value.status, conflict.value.code) == (409, "already_finished")
        with pytest.raises(ConflictError) as not_ready:
            client.download(second.id, tmp_path / "out.png")
        assert not_ready.value.code == "not_ready" and not (tmp_path / "out.png").exists()
        with pytest.raises(NotFoundError) as missing:
            MegaSRClient(api_key=KEY_B, http=TestClient(http.app)).get(second.id)  # another tenant's job
        assert missing.value.code == "job_not_found"
        with pytest.raises(InvalidRequestError) as invalid:
            client.submit(png(), steps=0)
        assert (invalid.value.status, invalid.value.code) == (422, "invalid_parameters")
        assert "steps" in invalid.value.message
        with pytest.raises(AuthenticationError) as denied:
            MegaSRClient(api_key="not-a-key-123", http=TestClient(http.app)).list_jobs()
        assert denied.value.code == "unauthorized" and isinstance(denied.value, MegaSRError)


def test_submit_wait_download_over_a_real_server(settings, tiny_pipeline, tmp_path):
    with live_server(create_app(settings)) as base, MegaSRClient(base, api_key=KEY_A) as client:
        job = client.submit(png(32, 24), steps=3, scale=2)
        seen, finished, following = [], [], threading.Event()

        def follow(current) -> None:
            seen.append(current)
            following.set()

        waiter = threading.Thread(target=lambda: finished.append(client.wait(job.id, on_progress=follow, timeout=120)))
        waiter.start()
        assert following.wait(30)
        run_worker(settings, tiny_pipeline)  # RQ wants the main thread
        waiter.join(timeout=120)
        done = finished[0]
        assert done.status == JobStatus.succeeded and done.output.width == 64
        assert seen[-1] == done and seen[0].id == job.id
        assert [j.progress for j in seen] == sorted(j.progress for j in seen)
        target = client.download(job.id, tmp_path / "result.png")
        assert Image.open(io.BytesIO(target.read_bytes())).size == (64, 48)
        assert (
            target.read_bytes()
            == httpx.get(f"{base}{done.result_url}", headers={"Authorization": f"Bearer {KEY_A}"}).content
        )
        queued = client.submit(png(), steps=1)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            client.wait(queued.id, timeout=1.0)  # no worker left: it stays queued
        assert time.monotonic() - started < 5  # not at the next keep-alive (15 s)


def test_wait_polls_when_the_event_stream_is_unavailable(settings, tiny_pipeline):
    paths = []

    def no_event_streams(request: httpx.Request) -> None:  # as a proxy that refuses long requests
        paths.append(request.url.path)
        if request.url.path.endswith("/events"):
            raise httpx.ConnectError("refused", request=request)

    with TestClient(create_app(settings)) as http:
        http.event_hooks["request"].append(no_event_streams)
        client = MegaSRClient(api_key=KEY_A, http=http, poll_interval_s=0.05)
        job = client.submit(png(), steps=1)
        run_worker(settings, tiny_pipeline)
        done = client.wait(job.id, timeout=30)
        assert done.status == JobStatus.succeeded
        assert paths[-2:] == [f"/v1/jobs/{job.id}/events", f"/v1/jobs/{job.id}"]


def test_wait_polls_when_the_tenants_event_streams_are_all_taken(tmp_path, db_url, tiny_pipeline):
    """429 too_many_streams (MEGASR_MAX_EVENT_STREAMS_PER_TENANT) is no error for wait(): it polls."""
    settings = make_settings(
        tmp_path, db_url, api_keys=f"a:{KEY_A},b:{KEY_B}", allow_anonymous=False, max_event_streams_per_tenant=1
    )
    with TestClient(create_app(settings)) as http:
        client = MegaSRClient(api_key=KEY_A, http=http, poll_interval_s=0.05)
        held, job = client.submit(png(), steps=1), client.submit(png(), steps=1)
        with http.stream("GET", f"/v1/jobs/{held.id}/events", headers={"Authorization": f"Bearer {KEY_A}"}) as open_:
            assert open_.status_code == 200  # the tenant's one stream, held open
            refused = http.get(f"/v1/jobs/{job.id}/events", headers={"Authorization": f"Bearer {KEY_A}"})
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams"
            run_worker(settings, tiny_pipeline)
            assert client.wait(job.id, timeout=30).status == JobStatus.succeeded
