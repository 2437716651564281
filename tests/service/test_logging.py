"""Log lines: JSON or text, with the job's context, and never a secret or an image."""

from __future__ import annotations

import base64
import logging

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service import tracing
from service.app import create_app
from service.logging_setup import (
    bind_log_context,
    configure_from_settings,
    configure_logging,
    fresh_log_context,
    log_context,
    log_fields,
)
from tests.service.helpers import json_lines, make_settings, png, run_worker, submit

KEY = "k3y-of-acme-0123456789"
WEBHOOK_SECRET = "whsec-never-print-me"
REDIS_PASSWORD = "valkey-pass-4242"


def test_json_lines_carry_the_job_context_api_and_worker(tmp_path, redis_url, tiny_pipeline, captured):
    settings = make_settings(tmp_path, redis_url, api_keys=SecretStr(f"acme:{KEY}"), log_format="json")
    configure_logging(settings.log_format, stream=captured)
    with TestClient(create_app(settings)) as client:
        response = submit(client, headers={"Authorization": f"Bearer {KEY}"}, steps=1, seed=2)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        run_worker(settings, tiny_pipeline)
    lines = json_lines(captured)
    succeeded = [e for e in lines if e["message"].startswith(f"job {job_id}: succeeded (")]
    assert len(succeeded) == 1, lines
    entry = succeeded[0]
    assert entry["logger"] == "megasr.worker" and entry["level"] == "INFO"
    assert entry["job_id"] == job_id and entry["tenant"] == "acme" and entry["stage"] == "store"
    assert entry["worker"].startswith("worker-")
    assert "trace_id" not in entry  # tracing is off
    done = [e for e in lines if e["message"].startswith(f"job {job_id}: attempt ")]
    assert done and done[0]["job_id"] == job_id and done[0]["tenant"] == "acme"
    assert log_context() == {}  # nothing the job bound outlives it


def test_trace_id_joins_logs_to_the_trace(tmp_path, redis_url, tiny_pipeline, captured):
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider

    configure_logging("json", stream=captured)
    tracing.configure_tracing(None, provider=TracerProvider())
    try:
        settings = make_settings(tmp_path, redis_url)
        with TestClient(create_app(settings)) as client:
            caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            job_id = submit(client, steps=1, headers={"traceparent": caller}).json()["id"]
            run_worker(settings, tiny_pipeline)
    finally:
        tracing.configure_tracing(None)
    succeeded = [e for e in json_lines(captured) if e["message"].startswith(f"job {job_id}: succeeded")]
    assert succeeded[0]["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_text_lines_end_with_the_context(captured):
    configure_logging("text", stream=captured)

    @fresh_log_context
    def job() -> None:
        bind_log_context(job_id="j1", tenant="acme", worker="worker-1")
        with log_fields(stage="denoise"):
            logging.getLogger("megasr.worker").warning("step %d of %d", 3, 50)
        logging.getLogger("megasr.worker").info("done")

    job()
    logging.getLogger("megasr.worker").info("idle")
    first, second, third = captured.getvalue().splitlines()
    assert first.endswith("WARNING megasr.worker: step 3 of 50 [job_id=j1 tenant=acme worker=worker-1 stage=denoise]")
    assert second.endswith("megasr.worker: done [job_id=j1 tenant=acme worker=worker-1]")
    assert third.endswith("megasr.worker: idle")


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_secrets_and_image_bytes_are_redacted(tmp_path, captured, fmt):
    settings = make_settings(
        tmp_path,
        f"redis://:{REDIS_PASSWORD}@valkey:6379/0",
        api_keys=SecretStr(f"acme:{KEY}"),
        webhook_secret=SecretStr(WEBHOOK_SECRET),
        metrics_key=SecretStr("metrics-key-777"),
        log_format=fmt,
    )
    configure_from_settings(settings)
    # the handler of configure_from_settings writes to stderr; point it at the buffer
    logging.getLogger().handlers[-1].setStream(captured)
    image = png()
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    log = logging.getLogger("megasr.test")
    log.info("connecting to %s", settings.redis_url)
    log.info("request headers: X-API-Key: %s, Authorization: Bearer %s", KEY, KEY)
    log.warning("signing with %s; metrics behind %s", WEBHOOK_SECRET, "metrics-key-777")
    log.info("body %s", {"image": data_url, "callback": "https://user:hunter2@example.com/hook"})
    log.info("read %s from storage", image)
    try:
        raise RuntimeError(f"cannot reach redis://default:{REDIS_PASSWORD}@valkey:6379 with {KEY}")
    except RuntimeError:
        log.exception("failed")
    text = captured.getvalue()
    for secret in (KEY, WEBHOOK_SECRET, REDIS_PASSWORD, "metrics-key-777", "hunter2", data_url[30:60]):
        assert secret not in text, secret
    assert "redis://:***@valkey:6379/0" in text and "https://user:***@example.com/hook" in text
    assert f"read <{len(image)} bytes> from storage" in text
    assert "data:image/png;base64,<" in text and "cannot reach redis://default:***@valkey" in text
    if fmt == "json":
        assert len(json_lines(captured)) == 6
