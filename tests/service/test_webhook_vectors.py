"""Webhook signatures against a known-answer vector, the exact event body, the address check, and the
dispatcher's retry schedule, final drop, redirects and thread."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import UTC

import pytest

from service.config import Settings
from service.contracts import JobRecord, JobStatus, UpscaleParams
from service.webhooks import DUE_KEY, SIGNATURE_HEADER, WebhookDispatcher, delivery_key, sign, verify
from tests.harness.webhook_receiver import WebhookReceiver
from tests.service.helpers import finish_with_webhook, make_settings

# Known-answer vector, computed outside Python with
#   printf '%s' '1700000000.{"id":"job-42","status":"succeeded"}' | openssl dgst -sha256 -hmac whsec_known_answer
KAT_SECRET = b"whsec_known_answer"
KAT_TIMESTAMP = 1_700_000_000
KAT_BODY = b'{"id":"job-42","status":"succeeded"}'
KAT_HEADER = "t=1700000000,v1=64df89d669447fe76bf061870115fe100cd9b93a241ec77ce9298854c6d51749"
KAT_NEXT_SECOND_HEX = "9b1bcb30e83fc2fa54c652ecff9e5d5cefe6d90a565d7fb6fabd0c8f838fd254"  # same body, t + 1
KAT_BODY_ONLY_HEX = "19b1757350a8f41442f01d7edb7e777cd2910083ba7766db77130a61b37f62b6"  # HMAC(body): NOT the scheme

SECRET = "webhook-vector-secret"


def readme_signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The scheme of docs/api.md (Webhooks), written out independently: t=T,v1=hex(HMAC-SHA256(secret, "T." + body))."""
    message = str(timestamp).encode() + b"." + body
    return f"t={timestamp},v1={hmac.new(secret, message, hashlib.sha256).hexdigest()}"


# ------------------------------------------------------------------ the signature


def test_signature_matches_the_known_answer_vector():
    """Fixed secret, timestamp and body give exactly the header computed by openssl and by hmac/hashlib."""
    assert readme_signature(KAT_SECRET, KAT_TIMESTAMP, KAT_BODY) == KAT_HEADER
    assert sign(KAT_SECRET, KAT_TIMESTAMP, KAT_BODY) == KAT_HEADER
    assert verify(KAT_SECRET, KAT_HEADER, KAT_BODY, now=KAT_TIMESTAMP + 10)


def test_changing_only_the_timestamp_changes_the_signature():
    """The timestamp is signed: t + 1 gives another digest, and an old digest under a new timestamp fails verify."""
    later = sign(KAT_SECRET, KAT_TIMESTAMP + 1, KAT_BODY)
    assert later == f"t={KAT_TIMESTAMP + 1},v1={KAT_NEXT_SECOND_HEX}"
    assert later.split(",v1=")[1] != KAT_HEADER.split(",v1=")[1]
    assert KAT_BODY_ONLY_HEX not in (KAT_HEADER, later)  # not an HMAC of the body alone
    # A replay that refreshes t but keeps the old digest must not verify.
    replayed = KAT_HEADER.replace(f"t={KAT_TIMESTAMP}", f"t={KAT_TIMESTAMP + 60}")
    assert not verify(KAT_SECRET, replayed, KAT_BODY, now=KAT_TIMESTAMP + 60)
    assert not verify(KAT_SECRET, KAT_HEADER, KAT_BODY + b" ", now=KAT_TIMESTAMP)


def test_the_dispatcher_sends_the_documented_signature(store):
    """A real delivery carries t=<send time>,v1=HMAC(secret, "t." + the exact body received)."""
    receiver = WebhookReceiver(lambda _n: 200)
    try:
        job_id = finish_with_webhook(store, receiver.url)
        (delivery_id,) = [raw.decode() for raw in store.redis.zrange(DUE_KEY, 0, -1)]
        dispatcher = WebhookDispatcher(store.redis, store, SECRET.encode(), allow_private=True)
        before = int(time.time())
        assert dispatcher.deliver_due() == 1
        after = int(time.time())
    finally:
        receiver.close()
    assert len(receiver.calls) == 1
    _, _, headers, body = receiver.calls[0]
    header = headers[SIGNATURE_HEADER]
    timestamp = int(header.split(",")[0].removeprefix("t="))
    assert before <= timestamp <= after
    assert header == readme_signature(SECRET.encode(), timestamp, body)
    event = json.loads(body)
    assert event["id"] == job_id and event["status"] == "canceled"
    assert store.redis.zcard(DUE_KEY) == 0 and not store.redis.exists(delivery_key(delivery_id))  # delivered once


# ------------------------------------------------------------------ retries


def test_retry_backoff_schedule_and_final_drop(tmp_path, store, db_url):
    """A receiver that always fails gets 6 tries, base·2^n apart (n = 0..4), then the delivery is dropped."""
    assert (
        Settings.model_fields["webhook_retry_base_s"].default == 2.0
    )  # docs/configuration.md: MEGASR_WEBHOOK_RETRY_BASE_S = 2
    settings = make_settings(
        tmp_path, db_url, webhook_secret=SECRET, webhook_allow_private=True, webhook_retry_base_s=0.05
    )
    base = settings.webhook_retry_base_s
    expected_delays = [base * 2**n for n in range(5)]  # 0.05, 0.1, 0.2, 0.4, 0.8
    receiver = WebhookReceiver(lambda _n: 500)
    try:
        finish_with_webhook(store, receiver.url)
        (delivery_id,) = [raw.decode() for raw in store.redis.zrange(DUE_KEY, 0, -1)]
        dispatcher = WebhookDispatcher(
            store.redis,
            store,
            settings.webhook_secret.get_secret_value().encode(),
            retry_base_s=settings.webhook_retry_base_s,
            allow_private=True,
        )
        scheduled = []  # (attempt, sent no earlier than, sent no later than, next due time) per failed try
        deadline = time.monotonic() + 30
        while len(receiver.calls) < 6 and time.monotonic() < deadline:
            before = time.time()
            attempted = dispatcher.deliver_due()
            after = time.time()
            if attempted:
                assert attempted == 1
                due = store.redis.zscore(DUE_KEY, delivery_id)
                attempt = store.redis.hget(delivery_key(delivery_id), "attempt")
                scheduled.append((int(attempt) if attempt is not None else None, before, after, due))
            else:
                time.sleep(0.005)
        # Wait past the next would-be retry (base·2^5 = 1.6 s): nothing more is sent.
        quiet_until = time.monotonic() + 1.25 * base * 2**5
        while time.monotonic() < quiet_until:
            assert dispatcher.deliver_due() == 0
            time.sleep(0.02)
    finally:
        receiver.close()

    assert len(receiver.calls) == 6
    assert [attempt for attempt, *_ in scheduled] == [1, 2, 3, 4, 5, None]
    for (attempt, before, after, due), delay in zip(scheduled[:5], expected_delays):
        assert before + delay - 1e-3 <= due <= after + delay + 1e-3, (attempt, due - after, delay)
    # The 6th failure drops the delivery: no schedule entry, no delivery record.
    assert scheduled[5][3] is None
    assert not store.redis.exists(delivery_key(delivery_id)) and store.redis.zcard(DUE_KEY) == 0
    # The receiver saw the retries no sooner than the schedule allowed.
    sent_at = [call.at for call in receiver.calls]
    for gap, delay in zip([b - a for a, b in zip(sent_at, sent_at[1:])], expected_delays):
        assert gap >= delay - 0.01, (gap, delay)
    # Each retry is signed afresh, over the same body.
    for at, _, headers, body in receiver.calls:
        assert verify(SECRET.encode(), headers[SIGNATURE_HEADER], body, now=at)


# ------------------------------------------------------------------ the event body, the URL check, scheduling


def test_payload_is_the_documented_event_exactly():
    """Every field of the documented event (docs/api.md, Webhooks), for a succeeded job (with a result link)
    and a failed one."""
    from datetime import datetime

    from service.contracts import JobError
    from service.webhooks import payload

    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    started, finished = created.replace(second=6), created.replace(second=9)
    done = JobRecord(
        id="job-7",
        tenant="t",
        status=JobStatus.succeeded,
        params=UpscaleParams(),
        progress=1.0,
        input_key="jobs/job-7/input",
        input_width=30,
        input_height=20,
        output_width=120,
        output_height=80,
        created_at=created,
        started_at=started,
        finished_at=finished,
    )
    assert json.loads(payload(done, "https://sr.example.com/")) == {
        "id": "job-7",
        "status": "succeeded",
        "model": "default",
        "model_info": None,
        "progress": 1.0,
        "created_at": "2026-01-02T03:04:05+00:00",
        "started_at": "2026-01-02T03:04:06+00:00",
        "finished_at": "2026-01-02T03:04:09+00:00",
        "input": {"width": 30, "height": 20},
        "output": {"width": 120, "height": 80},
        "error": None,
        "result_url": "https://sr.example.com/v1/jobs/job-7/result",
    }
    assert json.loads(payload(done, None))["result_url"] is None  # no public URL: no link
    raw = payload(done, None)
    assert raw == json.dumps(json.loads(raw), separators=(",", ":")).encode()  # compact: the signed bytes
    failed = done.model_copy(
        update={
            "status": JobStatus.failed,
            "progress": 0.5,
            "output_width": None,
            "output_height": None,
            "started_at": None,
            "error": JobError(code="bad_image", message="unreadable"),
        }
    )
    body = json.loads(payload(failed, "https://sr.example.com"))
    assert body["status"] == "failed" and body["progress"] == 0.5 and body["started_at"] is None
    assert body["output"] is None and body["result_url"] is None  # a link only for a success
    assert body["error"] == {"code": "bad_image", "message": "unreadable"}
    from megasr_core.identity import ModelIdentity
    from service.contracts import ModelInfo

    ran = ModelInfo(name="turbo", **ModelIdentity("seesr-turbo", "w", "float16", ("untrained",)).to_dict())
    body = json.loads(payload(done.model_copy(update={"model": "turbo", "model_info": ran}), None))
    assert body["model"] == "turbo" and body["model_info"] == ran.model_dump(mode="json")  # which model ran it


def test_verify_accepts_exactly_the_tolerance_and_no_more():
    """The timestamp may be off by the tolerance (default 300 s) in either direction."""
    header = sign(KAT_SECRET, KAT_TIMESTAMP, KAT_BODY)
    for offset in (300, -300):
        assert verify(KAT_SECRET, header, KAT_BODY, now=KAT_TIMESTAMP + offset)
    for offset in (301, -301):
        assert not verify(KAT_SECRET, header, KAT_BODY, now=KAT_TIMESTAMP + offset)
    assert verify(KAT_SECRET, header, KAT_BODY, tolerance_s=10, now=KAT_TIMESTAMP + 10)
    assert not verify(KAT_SECRET, header, KAT_BODY, tolerance_s=10, now=KAT_TIMESTAMP + 11)
    assert not verify(KAT_SECRET, "t=notanumber,v1=00", KAT_BODY) and not verify(KAT_SECRET, "v1=00", KAT_BODY)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "224.0.0.1",
        "240.0.0.1",
        "0.0.0.0",
        "::1",
        "fe80::1",
        "ff02::1",
    ],
)
def test_every_non_public_address_class_is_refused(address):
    """Loopback, private, link-local (cloud metadata), multicast and reserved: each refused on its own."""
    from service.webhooks import check_webhook_url

    host = f"[{address}]" if ":" in address else address
    with pytest.raises(ValueError, match="^webhook_url must point to a public address$"):
        check_webhook_url(f"http://{host}:8080/hook", allow_private=False)
    check_webhook_url(f"http://{host}:8080/hook", allow_private=True)  # explicitly allowed


def test_a_public_address_passes():
    from service.webhooks import check_webhook_url

    check_webhook_url("https://8.8.8.8/hook", allow_private=False)
    check_webhook_url("https://[2001:4860:4860::8888]/hook", allow_private=False)


def test_schedule_in_records_the_delivery_due_after_its_delay(store):
    from service.webhooks import PENDING_PREFIX, circuit_id, schedule_in

    record = JobRecord(
        id="job-9",
        tenant="t",
        params=UpscaleParams(webhook_url="https://8.8.8.8/hook"),
        input_key="jobs/job-9/input",
        input_width=8,
        input_height=8,
    )
    before = time.time()
    pipe = store.redis.pipeline()
    schedule_in(pipe, record, delay_s=30.0)
    pipe.execute()
    after = time.time()
    ((raw_id, due),) = store.redis.zrange(DUE_KEY, 0, -1, withscores=True)
    assert before + 30.0 <= due <= after + 30.0
    fields = {k.decode(): v.decode() for k, v in store.redis.hgetall(delivery_key(raw_id.decode())).items()}
    assert fields == {
        "job_id": "job-9",
        "url": "https://8.8.8.8/hook",
        "attempt": "0",
        "tenant": "t",
        "circuit": circuit_id("t", "https://8.8.8.8/hook"),
    }
    assert store.redis.zrange(PENDING_PREFIX + "t", 0, -1) == [raw_id]  # counted in the tenant's backlog


def test_redirects_are_not_followed(store):
    """A 3xx is a failed attempt, never a request to wherever it points (no SSRF through redirects).
    The receiver answers 307, which a client that follows redirects would repeat as a POST."""
    target = WebhookReceiver(lambda _n: 200)
    redirecting = WebhookReceiver(lambda _n: 307, headers={"Location": target.url})
    try:
        finish_with_webhook(store, redirecting.url)
        dispatcher = WebhookDispatcher(store.redis, store, SECRET.encode(), allow_private=True)
        assert dispatcher.deliver_due() == 1
    finally:
        redirecting.close()
        target.close()
    assert len(redirecting.calls) == 1 and target.calls == []
    ((raw_id, due),) = store.redis.zrange(DUE_KEY, 0, -1, withscores=True)  # rescheduled as a failure
    assert store.redis.hget(delivery_key(raw_id.decode()), "attempt") == b"1" and due > time.time()


def test_the_dispatcher_thread_delivers_and_survives_errors(store, monkeypatch):
    receiver = WebhookReceiver(lambda _n: 200)
    dispatcher = WebhookDispatcher(store.redis, store, SECRET.encode(), allow_private=True)
    real, failures = dispatcher.dispatch_due, []

    def flaky(limit: int = 50):
        if not failures:
            failures.append(1)
            raise RuntimeError("redis blip")
        return real(limit)

    monkeypatch.setattr(dispatcher, "dispatch_due", flaky)
    thread = dispatcher.start(interval_s=0.05)
    try:
        finish_with_webhook(store, receiver.url)
        deadline = time.time() + 10
        while not receiver.calls and time.time() < deadline:
            time.sleep(0.02)
    finally:
        dispatcher.stop()
        thread.join(timeout=5)
        receiver.close()
    assert failures and len(receiver.calls) == 1 and not thread.is_alive()
    assert thread.name == "megasr-webhooks" and thread.daemon


def test_deliveries_of_vanished_jobs_are_dropped_and_the_rest_still_sent(store):
    """A due delivery whose job record expired is deleted, not sent, and does not stop the others;
    the count is of the deliveries actually attempted."""
    receiver = WebhookReceiver(lambda _n: 200)
    try:
        first = finish_with_webhook(store, receiver.url)
        second = finish_with_webhook(store, receiver.url)
        vanished = finish_with_webhook(store, receiver.url)
        store.redis.delete(store.key(vanished))
        ids = {
            store.redis.hget(delivery_key(raw.decode()), "job_id").decode(): raw.decode()
            for raw in store.redis.zrange(DUE_KEY, 0, -1)
        }
        now = time.time()
        store.redis.zadd(DUE_KEY, {ids[vanished]: now - 30, ids[first]: now - 20, ids[second]: now - 10})
        dispatcher = WebhookDispatcher(
            store.redis, store, SECRET.encode(), allow_private=True, tenant_concurrency=3
        )  # all three at once (one tenant's)
        assert dispatcher.deliver_due() == 2
    finally:
        receiver.close()
    assert sorted(json.loads(call.body)["id"] for call in receiver.calls) == sorted([first, second])
    assert not store.redis.exists(delivery_key(ids[vanished])) and store.redis.zcard(DUE_KEY) == 0


def test_a_job_without_finish_time_still_makes_a_valid_event():
    from service.webhooks import payload

    running = JobRecord(
        id="job-1",
        tenant="t",
        status=JobStatus.running,
        params=UpscaleParams(),
        input_key="jobs/job-1/input",
        input_width=8,
        input_height=8,
    )
    body = json.loads(payload(running, "https://sr.example.com"))
    assert body["finished_at"] is None and body["started_at"] is None and body["output"] is None


# ------------------------------------------------------------------ the address policy, vector by vector

# (address, allowed, why): the table of service/webhook_policy.py's rules.
ADDRESS_VECTORS = [
    ("100.100.100.200", False, "CGNAT 100.64/10: Alibaba Cloud's metadata service"),
    ("100.64.0.1", False, "CGNAT, lowest"),
    ("2002:7f00:1::", False, "6to4 of 127.0.0.1"),
    ("192.0.0.8", False, "IETF protocol assignments 192.0.0/24 (is_global says yes on Python 3.11)"),
    ("127.0.0.1", False, "loopback"),
    ("127.255.255.254", False, "loopback, all of 127/8"),
    ("10.0.0.1", False, "RFC 1918"),
    ("10.255.255.255", False, "RFC 1918"),
    ("172.16.0.1", False, "RFC 1918"),
    ("192.168.1.1", False, "RFC 1918"),
    ("169.254.169.254", False, "link-local: AWS/GCP/Azure metadata"),
    ("0.0.0.0", False, "this host"),
    ("255.255.255.255", False, "broadcast"),
    ("198.18.0.1", False, "benchmarking 198.18/15"),
    ("198.19.255.255", False, "benchmarking, top"),
    ("240.0.0.1", False, "reserved 240/4"),
    ("224.0.0.1", False, "multicast"),
    ("192.0.2.1", False, "documentation"),
    ("192.88.99.1", False, "6to4 relay anycast"),
    ("::1", False, "IPv6 loopback"),
    ("::", False, "unspecified"),
    ("fc00::1", False, "unique local fc00::/7"),
    ("fdff:ffff::1", False, "unique local, fd half"),
    ("fe80::1", False, "link-local"),
    ("fec0::1", False, "site-local (deprecated)"),
    ("ff02::1", False, "multicast"),
    ("::ffff:127.0.0.1", False, "IPv4-mapped loopback"),
    ("::ffff:169.254.169.254", False, "IPv4-mapped metadata"),
    ("::127.0.0.1", False, "IPv4-compatible (deprecated): always refused"),
    ("::8.8.8.8", False, "IPv4-compatible, even of a public address"),
    ("64:ff9b::7f00:1", False, "NAT64 of 127.0.0.1"),
    ("64:ff9b::a9fe:a9fe", False, "NAT64 of 169.254.169.254"),
    ("64:ff9b:1:7f00:0:100::", False, "local-use NAT64 /48 of 127.0.0.1 (RFC 6052 layout)"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False, "Teredo (global server and client): always refused"),
    ("2001:0:7f00:1:8000:0:80ff:fffe", False, "Teredo with server 127.0.0.1, client 127.0.0.1"),
    ("2001:db8::1", False, "documentation"),
    ("3fff::1", False, "documentation (2024)"),
    ("5f00::1", False, "SRv6 SIDs: outside 2000::/3"),
    ("100::1", False, "discard-only"),
    ("8.8.8.8", True, "public"),
    ("1.1.1.1", True, "public"),
    ("100.128.0.1", True, "just above CGNAT"),
    ("2606:4700:4700::1111", True, "public IPv6"),
    ("2001:4860:4860::8888", True, "public IPv6"),
    ("2002:808:808::", True, "6to4 of 8.8.8.8: reaches only what 8.8.8.8 itself does"),
    ("::ffff:8.8.8.8", True, "IPv4-mapped public (how dual-stack sockets write IPv4)"),
    ("64:ff9b::808:808", True, "NAT64 of 8.8.8.8 (what DNS64 answers on IPv6-only networks)"),
    ("64:ff9b:1:808:8:800::", True, "local-use NAT64 of 8.8.8.8"),
]


@pytest.mark.parametrize(("address", "allowed", "why"), ADDRESS_VECTORS, ids=[v[0] for v in ADDRESS_VECTORS])
def test_address_policy_vectors(address, allowed, why):
    """Each vector on its own, through the pure policy function and through the submit-time URL check."""
    import ipaddress

    from service.webhook_policy import PUBLIC_ONLY, address_allowed, check_webhook_url

    assert address_allowed(ipaddress.ip_address(address)) is allowed, why
    url = "https://hooks.example.com/x"
    if allowed:
        check_webhook_url(url, allow_private=False, resolve=lambda _host, _port: [address])
    else:
        with pytest.raises(ValueError, match=f"^{PUBLIC_ONLY}$"):
            check_webhook_url(url, allow_private=False, resolve=lambda _host, _port: [address])
    check_webhook_url(url, allow_private=True, resolve=lambda _host, _port: [address])


def test_one_refused_address_among_public_ones_refuses_the_url():
    """A name answering with a public and a private address is refused: the connection could use either."""
    from service.webhook_policy import check_webhook_url

    with pytest.raises(ValueError, match="public address"):
        check_webhook_url(
            "https://hooks.example.com/x",
            allow_private=False,
            resolve=lambda _host, _port: ["8.8.8.8", "2606:4700:4700::1111", "10.0.0.7"],
        )
    with pytest.raises(ValueError, match="does not resolve"):
        check_webhook_url("https://hooks.example.com/x", allow_private=False, resolve=lambda _host, _port: [])


def test_zone_ids_are_dropped_before_the_check():
    from service.webhook_policy import address_allowed, parse_address

    assert str(parse_address("fe80::1%eth0")) == "fe80::1" and not address_allowed(parse_address("fe80::1%eth0"))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://8.8.8.8/x", "must use http or https"),
        ("file:///etc/passwd", "must use http or https"),
        ("gopher://8.8.8.8:70/_x", "must use http or https"),
        ("http://user:pw@8.8.8.8/x", "must not contain credentials"),
        ("http://user@8.8.8.8/x", "must not contain credentials"),
        ("http:///x", "must name a host"),
        ("http://8.8.8.8:99999/x", "not a valid URL"),
    ],
)
def test_url_rules_hold_even_with_private_addresses_allowed(url, message):
    from service.webhook_policy import check_webhook_url

    for allow_private in (False, True):
        with pytest.raises(ValueError, match=message):
            check_webhook_url(url, allow_private=allow_private)


def test_any_port_is_allowed_and_the_resolver_gets_it():
    from service.webhook_policy import check_webhook_url

    asked = []
    for url, port in [
        ("http://hooks.example.com:1/x", 1),
        ("https://hooks.example.com/x", 443),
        ("http://hooks.example.com/x", 80),
        ("https://hooks.example.com:65535/x", 65535),
    ]:
        check_webhook_url(url, allow_private=False, resolve=lambda host, p: asked.append((host, p)) or ["8.8.8.8"])
        assert asked[-1] == ("hooks.example.com", port)
