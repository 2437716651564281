"""Webhooks: delivered on completion, signed (HMAC-SHA256 over timestamp and body), retried."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.webhooks import SIGNATURE_HEADER, WebhookDispatcher, check_webhook_url, sign, verify
from tests.harness.webhook_receiver import WebhookReceiver
from tests.service.helpers import make_settings, run_worker, submit

SECRET = "webhook-secret-for-tests"


@pytest.fixture()
def receiver():
    server = WebhookReceiver(lambda n: 500 if n == 0 else 200)  # fails the first request, then accepts
    yield server
    server.close()


def test_webhook_delivered_signed_and_retried(tmp_path, redis_url, tiny_pipeline, receiver):
    settings = make_settings(
        tmp_path,
        redis_url,
        webhook_secret=SECRET,
        webhook_allow_private=True,
        webhook_retry_base_s=0.05,
        public_url="https://sr.example.com",
        allowed_hosts="testserver",
    )  # the TestClient's Host
    with TestClient(create_app(settings)) as client:
        job_id = submit(client, steps=1, webhook_url=receiver.url).json()["id"]
        run_worker(settings, tiny_pipeline)
        services = client.app.state.services
        dispatcher = WebhookDispatcher(
            services.redis,
            services.jobs,
            SECRET.encode(),
            public_url=settings.public_url,
            retry_base_s=settings.webhook_retry_base_s,
            allow_private=True,
        )
        import time

        deadline = time.monotonic() + 10
        while len(receiver.calls) < 2 and time.monotonic() < deadline:
            dispatcher.deliver_due()
            time.sleep(0.05)
    assert [call.status for call in receiver.calls] == [500, 200]
    _, _, headers, body = receiver.calls[-1]
    assert verify(SECRET.encode(), headers[SIGNATURE_HEADER], body)
    assert not verify(b"wrong secret", headers[SIGNATURE_HEADER], body)
    event = json.loads(body)
    assert event["id"] == job_id and event["status"] == "succeeded"
    assert event["result_url"] == f"https://sr.example.com/v1/jobs/{job_id}/result"


def test_webhook_on_cancel_and_dispatcher_thread(tmp_path, redis_url, receiver):
    settings = make_settings(
        tmp_path, redis_url, webhook_secret=SECRET, webhook_allow_private=True, webhook_retry_base_s=0.05
    )
    with TestClient(create_app(settings)) as client:
        job_id = submit(client, webhook_url=receiver.url).json()["id"]
        services = client.app.state.services
        dispatcher = WebhookDispatcher(
            services.redis, services.jobs, SECRET.encode(), retry_base_s=0.05, allow_private=True
        )
        dispatcher.start(interval_s=0.05)
        try:
            assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
            import time

            deadline = time.monotonic() + 10
            while len(receiver.calls) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            dispatcher.stop()
    assert json.loads(receiver.calls[-1].body)["status"] == "canceled"


def test_webhook_urls_are_checked(tmp_path, redis_url):
    with pytest.raises(ValueError, match="public address"):
        check_webhook_url("http://127.0.0.1:9/x", allow_private=False)
    with pytest.raises(ValueError, match="public address"):
        check_webhook_url("http://10.1.2.3/x", allow_private=False)
    check_webhook_url("http://127.0.0.1:9/x", allow_private=True)
    settings = make_settings(tmp_path, redis_url)  # no secret: webhooks off
    with TestClient(create_app(settings)) as client:
        response = submit(client, webhook_url="https://example.com/hook")
        assert response.status_code == 422 and "MEGASR_WEBHOOK_SECRET" in response.json()["error"]["message"]
    settings = make_settings(tmp_path, redis_url, webhook_secret=SECRET)
    with TestClient(create_app(settings)) as client:
        for url in (
            "http://localhost:8080/hook",
            "http://100.100.100.200/latest/meta-data/",
            "http://[2002:7f00:1::]:8080/hook",
            "http://192.0.0.8/hook",
        ):  # the last three passed before #13
            response = submit(client, webhook_url=url)
            assert response.status_code == 422 and "public address" in response.json()["error"]["message"], url
            assert response.json()["error"]["code"] == "invalid_parameters"


def test_signature_rejects_old_timestamps():
    body = b'{"id": "x"}'
    header = sign(b"k", 1_000, body)
    assert verify(b"k", header, body, now=1_100)
    assert not verify(b"k", header, body, now=10_000)
    assert not verify(b"k", "garbage", body)
