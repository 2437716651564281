"""Fair webhooks (#24) against real endpoints and a real Valkey: one tenant's black-hole endpoint (a socket that
accepts and never answers) does not delay another tenant's delivery, a tenant's unreachable host is deferred
without taking threads (per tenant and host), and a tenant's backlog is capped (newest dropped, logged, counted)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.config import Settings
from service.contracts import JobRecord, JobStatus, UpscaleParams
from service.jobsystem.store import JobStore
from service.webhooks import (
    DROPPED_KEY,
    DUE_KEY,
    PENDING_PREFIX,
    WebhookDispatcher,
    delivery_key,
)
from tests.harness.webhook_receiver import WebhookReceiver
from tests.service.helpers import make_settings

SECRET = b"webhook-fairness-secret"


class BlackHole:
    """A TCP endpoint that accepts every connection and never answers (until closed)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.accepted: list[socket.socket] = []
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self.listener.close()
        for connection in self.accepted:
            connection.close()


def finish(store: JobStore, tenant: str, url: str) -> str:
    """A job of ``tenant`` with ``webhook_url`` canceled: the final transition schedules its delivery."""
    job_id = uuid.uuid4().hex
    store.create(
        JobRecord(
            id=job_id,
            tenant=tenant,
            params=UpscaleParams(webhook_url=url),
            input_key=f"jobs/{job_id}/input",
            input_width=8,
            input_height=8,
        )
    )
    store.finish(job_id, JobStatus.canceled)
    return job_id


def deliveries_of(store: JobStore, tenant: str) -> dict[str, dict[str, str]]:
    """The tenant's waiting deliveries: id -> fields, with its due time."""
    found = {}
    for raw, due in store.redis.zrange(DUE_KEY, 0, -1, withscores=True):
        fields = {k.decode(): v.decode() for k, v in store.redis.hgetall(delivery_key(raw.decode())).items()}
        if fields.get("tenant") == tenant:
            found[raw.decode()] = {**fields, "due": due}
    return found


def test_webhook_defaults_are_the_shorter_fairer_ones():
    fields = Settings.model_fields
    assert fields["webhook_timeout_s"].default == 5.0  # connect + request + answer together, was 10
    assert fields["webhook_tenant_concurrency"].default == 2


def test_a_black_hole_of_one_tenant_does_not_delay_another_tenants_webhook(store):
    """Tenant A's 60 jobs point at a black hole; tenant B's webhook, due behind all of them, arrives at the
    next claim. Strictly by due time, B waited for A's 60 timeouts eight at a time (65 s with the old 10 s
    deadline; here about 6 s with a 1 s one). The circuit breaker is off here: this is the in-flight cap."""
    hole, quick = BlackHole(), WebhookReceiver(lambda _n: 204)
    dispatcher = WebhookDispatcher(
        store.redis,
        store,
        SECRET,
        allow_private=True,
        timeout_s=1.0,
        concurrency=8,
        retry_base_s=0.5,
        tenant_concurrency=2,
        circuit_failures=10_000,
    )
    thread = None
    try:
        for _ in range(60):
            finish(store, "tenant-a", hole.url)
        thread = dispatcher.start(interval_s=0.1)
        time.sleep(1.3)  # A's first two have timed out and two more are in flight
        assert 2 <= len(hole.accepted) <= 4, len(hole.accepted)  # never more than A's cap at once
        job_b = finish(store, "tenant-b", quick.url)
        started = time.monotonic()
        while not quick.calls and time.monotonic() - started < 4:
            time.sleep(0.02)
        waited = time.monotonic() - started
    finally:
        dispatcher.stop()
        if thread is not None:
            thread.join(timeout=5)
        hole.close()
        quick.close()
    assert [json.loads(call.body)["id"] for call in quick.calls] == [job_b]
    assert waited < 1.0, f"tenant B's webhook waited {waited:.1f} s behind tenant A's"


def test_an_unreachable_host_is_deferred_per_tenant_without_taking_threads(store, caplog):
    """Three attempts in a row that do not reach tenant A's host open A's circuit for it: A's other deliveries
    there are moved past the cool-down without an attempt and take no thread. Tenant C's deliveries to the same
    host are C's own circuit and still go out. After the cool-down one claim's worth is tried (half-open);
    their failure re-opens the circuit at once."""
    hole = BlackHole()
    dispatcher = WebhookDispatcher(
        store.redis,
        store,
        SECRET,
        allow_private=True,
        timeout_s=0.4,
        retry_base_s=60,
        tenant_concurrency=2,
        circuit_failures=3,
        circuit_cooldown_s=1.0,
    )
    try:
        for _ in range(20):
            finish(store, "tenant-a", hole.url)
        with caplog.at_level(logging.WARNING, logger="megasr.webhooks"):
            assert dispatcher.deliver_due() == 2 and dispatcher.deliver_due() == 2  # failures 1-4: open after 3
        assert "tenant-a to 127.0.0.1:" in caplog.text and "deferred for 1 s" in caplog.text
        opened_at = time.time()
        assert dispatcher.deliver_due() == 0 and dispatcher._in_flight == 0  # deferred: no thread, no attempt
        assert len(hole.accepted) == 4
        waiting = deliveries_of(store, "tenant-a")
        untried = [fields for fields in waiting.values() if fields["attempt"] == "0"]
        assert len(untried) == 16 and all(opened_at + 0.5 < fields["due"] <= opened_at + 1.0 for fields in untried)

        finish(store, "tenant-c", hole.url)  # the same host, another tenant: its own circuit
        assert dispatcher.deliver_due() == 1 and len(hole.accepted) == 5

        time.sleep(max(0.0, max(fields["due"] for fields in untried) - time.time()) + 0.05)
        assert dispatcher.deliver_due() == 2  # half-open: A's cap of them are tried
        assert dispatcher.deliver_due() == 0  # they failed: open again
        assert len(hole.accepted) == 7
        assert sum(fields["attempt"] == "0" for fields in deliveries_of(store, "tenant-a").values()) == 14
    finally:
        dispatcher.stop()
        hole.close()


def metric(client: TestClient, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"no {name}{labels}")


def test_a_tenants_backlog_over_its_cap_drops_the_newest_with_a_log_and_a_metric(tmp_path, store, db_url, caplog):
    """Cap 5: tenant A's 8 finished jobs keep their first 5 deliveries; the 3 newest are dropped (logged with
    the job id, counted fleet-wide), and tenant B's deliveries are untouched."""
    receiver = WebhookReceiver(lambda _n: 204)
    try:
        jobs_a = [finish(store, "tenant-a", receiver.url) for _ in range(8)]
        jobs_b = [finish(store, "tenant-b", receiver.url) for _ in range(2)]
        dispatcher = WebhookDispatcher(
            store.redis, store, SECRET, allow_private=True, tenant_concurrency=10, max_pending_per_tenant=5
        )
        with caplog.at_level(logging.WARNING, logger="megasr.webhooks"):
            assert dispatcher.deliver_due() == 7
    finally:
        receiver.close()
    assert sorted(json.loads(call.body)["id"] for call in receiver.calls) == sorted(jobs_a[:5] + jobs_b)
    for job_id in jobs_a[5:]:
        assert f"webhook for job {job_id} dropped: tenant tenant-a has 5 deliveries waiting" in caplog.text
    assert store.redis.zcard(DUE_KEY) == 0 and not store.redis.exists(PENDING_PREFIX + "tenant-a")
    with TestClient(create_app(make_settings(tmp_path, db_url))) as client:
        assert metric(client, "megasr_webhooks_dropped_total", reason="backlog") == 3


def test_a_delivery_given_up_after_its_last_attempt_is_counted(tmp_path, store, db_url):
    receiver = WebhookReceiver(lambda _n: 500)
    try:
        finish(store, "tenant-a", receiver.url)
        ((raw_id,),) = [store.redis.zrange(DUE_KEY, 0, -1)]
        store.redis.hset(delivery_key(raw_id.decode()), "attempt", 5)  # the next one is the last
        assert WebhookDispatcher(store.redis, store, SECRET, allow_private=True).deliver_due() == 1
    finally:
        receiver.close()
    assert store.redis.zcard(DUE_KEY) == 0 and store.redis.hget(DROPPED_KEY, "attempts") == b"1"
    with TestClient(create_app(make_settings(tmp_path, db_url))) as client:
        assert metric(client, "megasr_webhooks_dropped_total", reason="attempts") == 1
        assert metric(client, "megasr_webhooks_dropped_total", reason="backlog") == 0
