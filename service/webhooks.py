"""Webhooks: on a job's final status, POST its JSON to ``webhook_url``, signed, with retries.

Durability: the delivery is written to Redis in the same transaction as the final status, so a
crash cannot lose it. A dispatcher (in every worker and in ``megasr serve``) sends due deliveries
on a pool of ``MEGASR_WEBHOOK_CONCURRENCY`` threads (default 8), so the worker never waits on a
client's server and one slow receiver never holds up the others. A dispatcher *claims* a delivery
by moving its due time to the end of a lease (delivery deadline + :data:`LEASE_SLACK_S`) in one
Lua script, so several processes never send it at once, and a delivery whose dispatcher dies
mid-flight comes due again when the lease ends: delivery is at least once, never lost. The outcome
is recorded only while the claim still holds. Failed attempts are retried with exponential
backoff (``MEGASR_WEBHOOK_RETRY_BASE_S · 2^n`` seconds, :data:`MAX_ATTEMPTS` tries in all).

Each attempt (:mod:`service.webhook_policy`, :mod:`service.webhook_http`) resolves the URL's host
again, checks every address (public only, unless ``MEGASR_WEBHOOK_ALLOW_PRIVATE``), connects to a
checked address (DNS pinning: the ``Host`` header, TLS SNI and certificate check still use the
URL's host), and must finish within ``MEGASR_WEBHOOK_TIMEOUT_S`` (default 10 s) for connect,
request, response headers and body together; at most 64 KiB of the answer are read. Any 2xx is a
success; redirects are not followed (a 3xx is a failure). Proxy environment variables are ignored.

Headers of every attempt:

* ``webhook-id``: the delivery's id, the same on every retry of it (receivers dedupe on it; a
  job's final status makes one delivery);
* ``webhook-timestamp``: the attempt's unix time, the ``t`` of the signature;
* ``X-MegaSR-Signature: t=<unix time>,v1=<hex>`` where ``hex`` is
  HMAC-SHA256(``MEGASR_WEBHOOK_SECRET``, ``"<t>." + body``). Receivers recompute it and reject
  old timestamps (:func:`verify` does both). ``webhook-id`` is not signed; the signed body's
  ``id`` and ``status`` name the event too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import ssl
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import redis

from .contracts import JobRecord
from .webhook_http import HTTP_ERRORS, post
from .webhook_policy import Resolver, check_webhook_url, checked_addresses, parse_webhook_url, resolve_host

__all__ = ["DUE_KEY", "ID_HEADER", "MAX_ATTEMPTS", "SIGNATURE_HEADER", "TIMESTAMP_HEADER", "WebhookDispatcher",
           "check_webhook_url", "delivery_key", "payload", "schedule_in", "sign", "verify"]

log = logging.getLogger("megasr.webhooks")
DUE_KEY = "megasr:webhooks:due"
SIGNATURE_HEADER = "X-MegaSR-Signature"
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
MAX_ATTEMPTS = 6
LEASE_SLACK_S = 30.0  # a claim outlives the delivery deadline by this much (DNS, Redis, scheduling)
SETTLE_RETRY_S = 0.5  # pause between tries to record an outcome while Redis is unreachable


def delivery_key(delivery_id: str) -> str:
    return f"megasr:webhook:{delivery_id}"


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: bytes, header: str, body: bytes, tolerance_s: int = 300, now: float | None = None) -> bool:
    """Check a ``X-MegaSR-Signature`` header (for receivers, and our tests)."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((now or time.time()) - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header)


def schedule_in(pipe: redis.client.Pipeline, record: JobRecord, delay_s: float = 0.0) -> None:
    """Add a delivery for ``record`` to a Redis transaction (called with the final transition)."""
    delivery_id = uuid.uuid4().hex
    pipe.hset(delivery_key(delivery_id), mapping={"job_id": record.id, "url": str(record.params.webhook_url), "attempt": 0})
    pipe.zadd(DUE_KEY, {delivery_id: time.time() + delay_s})


def payload(record: JobRecord, public_url: str | None) -> bytes:
    body = {
        "id": record.id,
        "status": record.status.value,
        "model": record.model,
        "model_info": record.model_info.model_dump(mode="json") if record.model_info else None,
        "progress": record.progress,
        "created_at": record.created_at.isoformat(),
        "started_at": record.started_at.isoformat() if record.started_at else None,
        "finished_at": record.finished_at.isoformat() if record.finished_at else None,
        "input": {"width": record.input_width, "height": record.input_height},
        "output": {"width": record.output_width, "height": record.output_height} if record.output_width else None,
        "error": record.error.model_dump() if record.error else None,
        "result_url": f"{public_url.rstrip('/')}/v1/jobs/{record.id}/result"
        if public_url and record.status.value == "succeeded" else None,
    }
    return json.dumps(body, separators=(",", ":")).encode()


# Claim up to ARGV[3] deliveries due by ARGV[1]: each one's due time becomes ARGV[2], the end of the
# lease, so no other dispatcher takes it before then, and it is due again by itself if we die.
CLAIM_SCRIPT = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[2], id)
end
return ids
"""

# Record an attempt's outcome (KEYS: due set, delivery hash; ARGV: id, our lease end, 'done' or
# 'retry', attempt, next due time), only while our claim holds: once a lease ran out and another
# dispatcher took the delivery over, the outcome is that one's to record.
SETTLE_SCRIPT = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then
  return 0
end
if ARGV[3] == 'done' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2])
else
  redis.call('HSET', KEYS[2], 'attempt', ARGV[4])
  redis.call('ZADD', KEYS[1], ARGV[5], ARGV[1])
end
return 1
"""


@dataclass(frozen=True)
class Claim:
    delivery_id: str
    lease_until: float  # the due-set score this claim set; the fence for recording the outcome


class WebhookDispatcher:
    """Sends due deliveries on a bounded thread pool; safe to run in several processes at once."""

    def __init__(self, client: redis.Redis, jobs, secret: bytes, public_url: str | None = None,
                 retry_base_s: float = 2.0, timeout_s: float = 10.0, concurrency: int = 8,
                 allow_private: bool = False, resolve: Resolver = resolve_host,
                 ssl_context: ssl.SSLContext | None = None, lease_slack_s: float = LEASE_SLACK_S) -> None:
        self.redis, self.jobs, self.secret = client, jobs, secret
        self.public_url, self.retry_base_s = public_url, retry_base_s
        self.timeout_s, self.concurrency, self.lease_slack_s = timeout_s, concurrency, lease_slack_s
        self.allow_private, self.resolve = allow_private, resolve
        self.ssl_context = ssl_context or httpx.create_ssl_context()
        self._claim_script = client.register_script(CLAIM_SCRIPT)
        self._settle_script = client.register_script(SETTLE_SCRIPT)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="megasr-webhook")
        self._lock = threading.Lock()
        self._in_flight = 0
        self._stop = threading.Event()

    # -------------------------------------------------------------- claiming and scheduling

    def claim(self, limit: int) -> list[Claim]:
        """Atomically lease up to ``limit`` due deliveries to this dispatcher."""
        if limit <= 0:
            return []
        now = time.time()
        lease_until = now + self.timeout_s + self.lease_slack_s
        ids = self._claim_script(keys=[DUE_KEY], args=[repr(now), repr(lease_until), limit])
        return [Claim(raw.decode(), lease_until) for raw in ids]

    def dispatch_due(self, limit: int = 50) -> list[Future[bool]]:
        """Start due deliveries on the pool, no more than it has free threads (a claimed delivery
        never waits in a queue while its lease runs); returns at once."""
        with self._lock:
            claims = self.claim(min(limit, self.concurrency - self._in_flight))
            self._in_flight += len(claims)
        return [self._pool.submit(self._run, claim) for claim in claims]

    def deliver_due(self, limit: int = 50) -> int:
        """Start due deliveries and wait for them; returns how many were attempted."""
        return sum(future.result() for future in self.dispatch_due(limit))

    def _run(self, claim: Claim) -> bool:
        try:
            return self.deliver(claim)
        except Exception as exc:  # e.g. Redis gone: the lease runs out and the delivery is retried
            log.warning("webhook delivery %s: %s", claim.delivery_id, exc)
            raise
        finally:
            with self._lock:
                self._in_flight -= 1

    # -------------------------------------------------------------- one attempt

    def deliver(self, claim: Claim) -> bool:
        """One attempt at a claimed delivery, its outcome recorded; ``False`` if its job is gone."""
        key = delivery_key(claim.delivery_id)
        fields = {k.decode(): v.decode() for k, v in self.redis.hgetall(key).items()}
        record = self.jobs.get(fields.get("job_id", ""))
        if record is None:
            self._settle(claim, "done")
            return False
        attempt = int(fields.get("attempt", 0)) + 1
        ok, reason = self.send(claim.delivery_id, fields["url"], payload(record, self.public_url))
        if ok:
            self._settle(claim, "done")
        elif attempt >= MAX_ATTEMPTS:
            self._settle(claim, "done")
            log.warning("webhook for job %s dropped after %d attempts (%s)", record.id, attempt, reason)
        else:
            self._settle(claim, "retry", attempt, time.time() + self.retry_base_s * 2 ** (attempt - 1))
            log.info("webhook for job %s failed (%s); retry %d scheduled", record.id, reason, attempt)
        return True

    def send(self, delivery_id: str, url: str, body: bytes) -> tuple[bool, str]:
        """POST ``body`` once: resolve and check the host now, connect to a checked address. The time
        spent resolving counts against the deadline (``getaddrinfo`` cannot be interrupted: a hanging
        resolver is bounded by its own timeout, and the claim's lease covers it). Returns (success, reason)."""
        started = time.monotonic()
        try:
            target = parse_webhook_url(url)
            addresses = checked_addresses(target, self.allow_private, self.resolve)
        except ValueError as exc:
            return False, str(exc)
        left = self.timeout_s - (time.monotonic() - started)
        if left <= 0:
            return False, "deadline exceeded while resolving"
        timestamp = int(time.time())
        headers = {"Host": target.authority, "Content-Type": "application/json", "User-Agent": "megasr-webhooks/1",
                   ID_HEADER: delivery_id, TIMESTAMP_HEADER: str(timestamp),
                   SIGNATURE_HEADER: sign(self.secret, timestamp, body)}
        try:
            response = post(url, addresses, headers, body, timeout_s=left, ssl_context=self.ssl_context)
        except HTTP_ERRORS as exc:
            return False, f"{type(exc).__name__}: {exc}"
        return 200 <= response.status < 300, f"HTTP {response.status}"

    def _settle(self, claim: Claim, outcome: str, attempt: int = 0, next_due: float = 0.0) -> None:
        """Record the outcome; Redis errors are retried while the lease lasts (a restart must not turn a
        delivered webhook into a duplicate when the lease ends)."""
        while True:
            try:
                recorded = self._settle_script(keys=[DUE_KEY, delivery_key(claim.delivery_id)],
                                               args=[claim.delivery_id, repr(claim.lease_until), outcome, attempt,
                                                     repr(next_due)])
                break
            except (redis.ConnectionError, redis.TimeoutError):  # BusyLoadingError (restarting) is one
                if time.time() + SETTLE_RETRY_S >= claim.lease_until:
                    raise
                time.sleep(SETTLE_RETRY_S)
        if not recorded:
            log.warning("webhook delivery %s: lease ran out before the outcome (%s) was recorded",
                        claim.delivery_id, outcome)  # pragma: no mutate

    # -------------------------------------------------------------- the thread

    def start(self, interval_s: float = 0.5) -> threading.Thread:
        """Dispatch due deliveries every ``interval_s`` until :meth:`stop`, never waiting for one."""
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.dispatch_due()
                except Exception as exc:  # never let a Redis blip stop the thread
                    log.warning("webhook dispatcher: %s", exc)

        thread = threading.Thread(target=loop, name="megasr-webhooks", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Stop claiming; deliveries in flight finish (each within its deadline)."""
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
