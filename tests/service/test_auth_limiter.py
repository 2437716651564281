"""The failed-auth limiter (#24): a valid key is always served, wrong keys are limited per client and per
presented-key prefix, IPv6 clients count per /64, and behind a trusted proxy the client is the first
untrusted X-Forwarded-For hop from the right (a real uvicorn with proxy headers). Real Valkey throughout."""

from __future__ import annotations

import uuid

import httpx
from fastapi.testclient import TestClient

from service.app import create_app
from tests.harness.live_server import live_server
from tests.service.helpers import make_settings

KEY = "tenant-key-0123456789"
METRICS_KEY = "metrics-key-0123456789"
LIMIT = 10


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def guess(n: int) -> str:
    """A wrong key with its own prefix (its own key bucket), so only the client's bucket is shared."""
    return f"{n:04d}{uuid.uuid4().hex}"


def job_url() -> str:
    return f"/v1/jobs/{uuid.uuid4().hex}"


def keyed_app(tmp_path, db_url):
    return create_app(
        make_settings(tmp_path, db_url, api_keys=f"acme:{KEY}", metrics_key=METRICS_KEY, auth_failures_per_minute=LIMIT)
    )


def test_a_valid_key_works_after_15_wrong_keys_from_its_address(tmp_path, db_url):
    """Ten wrong keys used to make every valid key from that address 429: one client behind a NAT or the
    ingress locked out every tenant there. Now wrong keys get 429 and valid ones are served."""
    with TestClient(keyed_app(tmp_path, db_url), client=("203.0.113.7", 5000)) as client:
        statuses = [client.get(job_url(), headers=bearer(guess(n))).status_code for n in range(15)]
        assert statuses == [401] * LIMIT + [429] * 5
        limited = client.get(job_url(), headers=bearer(guess(99)))
        error = limited.json()["error"]
        assert error["code"] == "too_many_auth_failures" and "this address" in error["message"]
        assert client.get(job_url(), headers=bearer(KEY)).status_code == 404  # served: an unknown job of acme
        assert client.get("/metrics", headers=bearer(METRICS_KEY)).status_code == 200
        assert client.get("/metrics", headers=bearer(guess(100))).status_code == 429


def test_one_key_prefix_is_limited_across_addresses(tmp_path, db_url):
    """A guesser rotating addresses keeps spending its key prefix's budget; other prefixes are not affected."""
    app = keyed_app(tmp_path, db_url)
    statuses = []
    for n in range(LIMIT + 2):
        with TestClient(app, client=(f"198.51.100.{n + 1}", 5000)) as client:
            statuses.append(client.get(job_url(), headers=bearer(f"sameprefix-{uuid.uuid4().hex}")).status_code)
    assert statuses == [401] * LIMIT + [429] * 2
    with TestClient(app, client=("198.51.100.200", 5000)) as client:
        refused = client.get(job_url(), headers=bearer("sameprefix-other-ending"))
        assert refused.status_code == 429 and "this key" in refused.json()["error"]["message"]
        assert client.get(job_url(), headers=bearer("otherprefix-0123456789")).status_code == 401
        assert client.get(job_url(), headers=bearer(KEY)).status_code == 404


def test_ipv6_clients_count_per_64(tmp_path, db_url):
    """Rotating addresses inside one /64 (what one site gets) resets nothing; another /64 has its own budget."""
    app = keyed_app(tmp_path, db_url)
    statuses = []
    for n in range(LIMIT + 1):
        with TestClient(app, client=(f"2001:db8:7:1::{n + 1:x}", 5000)) as client:
            statuses.append(client.get(job_url(), headers=bearer(guess(n))).status_code)
    assert statuses == [401] * LIMIT + [429]
    with TestClient(app, client=("2001:db8:7:2::1", 5000)) as client:
        assert client.get(job_url(), headers=bearer(guess(50))).status_code == 401


def test_behind_a_trusted_proxy_prepended_forwarded_addresses_do_not_escape(tmp_path, db_url, monkeypatch):
    """A real uvicorn with proxy headers trusting the loopback peer, as the API image trusts its ingress: the
    proxy appends the real client to X-Forwarded-For and uvicorn takes the first untrusted hop from the
    right, so the addresses a client prepends (rotated on every request) change nothing."""
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "127.0.0.1")  # uvicorn's own setting, read by uvicorn.Config
    with live_server(keyed_app(tmp_path, db_url)) as base, httpx.Client(base_url=base, timeout=10) as http:

        def status(forwarded: str, token: str) -> int:
            return http.get(job_url(), headers={**bearer(token), "X-Forwarded-For": forwarded}).status_code

        rotated = [status(f"192.0.2.{n}, 10.9.8.{n}, 198.51.100.7", guess(n)) for n in range(LIMIT + 3)]
        assert rotated == [401] * LIMIT + [429] * 3
        assert status("198.51.100.7", guess(90)) == 429  # the same client without a prefix
        assert status("192.0.2.1, 198.51.100.8", guess(91)) == 401  # another client behind the same proxy
        assert status("198.51.100.7", KEY) == 404  # the limited client's valid key is served
        assert status("2001:db8:9::1, 127.0.0.1", guess(92)) == 401  # trusted hops are skipped from the right
