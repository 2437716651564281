"""OpenTelemetry: one trace per job, from the API request through the queue to the worker's stages."""

from __future__ import annotations

import pytest
import redis
from fastapi.testclient import TestClient

from service import tracing
from service.app import create_app
from service.jobsystem.store import JobStore
from tests.service.helpers import make_settings, run_worker, submit

pytest.importorskip("opentelemetry.sdk")


def test_a_job_is_one_trace_from_request_to_stored_result(tmp_path, redis_url, tiny_pipeline, spans):
    settings = make_settings(tmp_path, redis_url)
    with TestClient(create_app(settings)) as client:
        caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"  # the client's own trace continues
        response = submit(client, steps=2, seed=1, headers={"traceparent": caller})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        run_worker(settings, tiny_pipeline)
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"

    finished = spans.get_finished_spans()
    by_name = {span.name: span for span in finished}
    request = by_name["POST /v1/upscale"]
    enqueue, job, store = by_name["enqueue"], by_name["worker.job"], by_name["store"]
    stages = [s for s in finished if s.name.startswith("stage.")]
    assert {"stage.extractors", "stage.denoise", "stage.vae_decode"} <= {s.name for s in stages}

    trace_id = int("0af7651916cd43dd8448eb211c80319c", 16)
    for span in (request, enqueue, job, store, *stages):
        assert span.context.trace_id == trace_id, span.name
    assert request.parent.span_id == int("b7ad6b7169203331", 16)
    assert enqueue.parent.span_id == request.context.span_id
    assert job.parent.span_id == enqueue.context.span_id  # across the queue, through JobRecord.trace_context
    assert store.parent.span_id == job.context.span_id
    assert all(s.parent.span_id == job.context.span_id for s in stages)
    assert request.attributes["http.response.status_code"] == 202
    assert enqueue.attributes["megasr.job_id"] == job_id == job.attributes["megasr.job_id"]
    # the stages lie end to end inside the job span, as long as the pipeline timed them
    ordered = sorted(stages, key=lambda s: s.start_time)
    assert all(a.end_time == b.start_time for a, b in zip(ordered, ordered[1:]))
    assert job.start_time <= ordered[0].start_time and ordered[-1].end_time <= store.start_time <= job.end_time


def test_without_an_endpoint_tracing_stays_off(tmp_path, redis_url, tiny_pipeline):
    assert not tracing.configure_tracing(None)
    settings = make_settings(tmp_path, redis_url)
    with TestClient(create_app(settings)) as client:
        job_id = submit(client, steps=1).json()["id"]
        run_worker(settings, tiny_pipeline)
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    record = JobStore(redis.Redis.from_url(redis_url), result_ttl_s=60).get(job_id)
    assert record.trace_context is None and tracing.current_trace_id() is None


def test_each_job_of_a_batch_keeps_its_own_trace(tmp_path, redis_url, tiny_pipeline, spans):
    settings = make_settings(tmp_path, redis_url, max_batch=2, batch_wait_ms=0)
    with TestClient(create_app(settings)) as client:
        ids = [submit(client, steps=1, seed=seed).json()["id"] for seed in (1, 2)]
        run_worker(settings, tiny_pipeline)
        assert all(client.get(f"/v1/jobs/{i}").json()["status"] == "succeeded" for i in ids)
    finished = spans.get_finished_spans()
    enqueues = {s.attributes["megasr.job_id"]: s for s in finished if s.name == "enqueue"}
    jobs = {s.attributes["megasr.job_id"]: s for s in finished if s.name == "worker.job"}
    assert set(enqueues) == set(jobs) == set(ids)
    assert enqueues[ids[0]].context.trace_id != enqueues[ids[1]].context.trace_id
    for job_id in ids:
        job = jobs[job_id]
        assert job.attributes["megasr.batch_size"] == 2  # one pipeline call for both
        assert job.parent.span_id == enqueues[job_id].context.span_id
        assert job.context.trace_id == enqueues[job_id].context.trace_id
        stages = [s for s in finished if s.parent is not None and s.parent.span_id == job.context.span_id]
        assert {"stage.denoise", "store"} <= {s.name for s in stages}


def test_an_otlp_endpoint_receives_the_spans():
    """MEGASR_OTLP_ENDPOINT: spans leave over OTLP/HTTP (protobuf) to a collector, here a local HTTP server."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry import trace

    received: list[tuple[str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_port}/v1/traces"
        assert tracing.configure_tracing(endpoint, service_name="megasr-test")
        with tracing.span("enqueue", job_id="j-otlp"):
            assert tracing.current_trace_id() is not None
        assert trace.get_tracer_provider().force_flush(10_000)
    finally:
        tracing.configure_tracing(None)
        server.shutdown()
    assert received and received[0][0] == "/v1/traces"
    body = b"".join(b for _, b in received)
    assert b"enqueue" in body and b"j-otlp" in body and b"megasr-test" in body
