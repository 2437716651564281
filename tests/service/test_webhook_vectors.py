"""Webhook signatures against a known-answer vector, and the dispatcher's exact retry schedule and final drop."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid


from service.config import Settings
from service.contracts import JobRecord, JobStatus, UpscaleParams
from service.jobs import JobStore
from service.webhooks import DUE_KEY, SIGNATURE_HEADER, WebhookDispatcher, delivery_key, sign, verify
from tests.service.conftest import WebhookReceiver
from tests.service.test_api import make_settings

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
    """The README's scheme, written out independently: t=T,v1=hex(HMAC-SHA256(secret, "T." + body))."""
    message = str(timestamp).encode() + b"." + body
    return f"t={timestamp},v1={hmac.new(secret, message, hashlib.sha256).hexdigest()}"


def finish_with_webhook(store: JobStore, url: str) -> str:
    """A job with ``webhook_url`` canceled: the final transition schedules its delivery."""
    job_id = uuid.uuid4().hex
    record = JobRecord(id=job_id, tenant="hooks", params=UpscaleParams(webhook_url=url),
                       input_key=f"jobs/{job_id}/input", input_width=8, input_height=8)
    store.create(record)
    store.finish(job_id, JobStatus.canceled)
    return job_id


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
        dispatcher = WebhookDispatcher(store.redis, store, SECRET.encode())
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
    assert Settings.model_fields["webhook_retry_base_s"].default == 2.0  # README: MEGASR_WEBHOOK_RETRY_BASE_S = 2
    settings = make_settings(tmp_path, db_url, webhook_secret=SECRET, webhook_allow_private=True,
                             webhook_retry_base_s=0.05)
    base = settings.webhook_retry_base_s
    expected_delays = [base * 2**n for n in range(5)]  # 0.05, 0.1, 0.2, 0.4, 0.8
    receiver = WebhookReceiver(lambda _n: 500)
    try:
        finish_with_webhook(store, receiver.url)
        (delivery_id,) = [raw.decode() for raw in store.redis.zrange(DUE_KEY, 0, -1)]
        dispatcher = WebhookDispatcher(store.redis, store, settings.webhook_secret.get_secret_value().encode(),
                                       retry_base_s=settings.webhook_retry_base_s)
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
