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

Fair across tenants (one tenant's dead endpoint must not delay another tenant's webhooks):

* **In-flight cap.** A process runs at most ``MEGASR_WEBHOOK_TENANT_CONCURRENCY`` (2) deliveries of
  one tenant at once. The claim walks the due set in due order and passes over deliveries of tenants
  at their cap, so the next tenant's delivery takes the free thread at once. The walk is bounded: only
  tenants at their cap are passed over, at most ``concurrency // tenant cap`` of them, each with at
  most ``MEGASR_WEBHOOK_MAX_PENDING_PER_TENANT`` deliveries.
* **Circuit breaker, per tenant and host.** After ``MEGASR_WEBHOOK_CIRCUIT_FAILURES`` (5) attempts
  in a row that could not reach the host (timeout, refused or reset connection, no DNS answer), that
  tenant's deliveries to that host are deferred for ``MEGASR_WEBHOOK_CIRCUIT_COOLDOWN_S`` (60) when
  they come up in a claim: they take no thread and no attempt. Then one claim's worth are tried again
  (half-open); a failure re-opens the circuit at once, a success closes it. The state is in Redis,
  shared by every dispatcher (one process's evidence spares all the others' threads, and a restart
  keeps it), and keyed by tenant *and* host: one tenant pointing at a host cannot shut it for others.
  A host that answers, even with 4xx/5xx, costs a thread for milliseconds and is left to the retry
  schedule.
* **Bounded backlog.** Each tenant has at most ``MEGASR_WEBHOOK_MAX_PENDING_PER_TENANT`` (500)
  deliveries waiting. Before each claim the dispatcher drops the newest ones over the cap (logged
  with the job id, counted in ``megasr_webhooks_dropped_total{reason="backlog"}``); deliveries given
  up after the last try count as ``reason="attempts"``.

Each attempt (:mod:`service.webhook_policy`, :mod:`service.webhook_http`) resolves the URL's host
again, checks every address (public only, unless ``MEGASR_WEBHOOK_ALLOW_PRIVATE``), connects to a
checked address (DNS pinning: the ``Host`` header, TLS SNI and certificate check still use the
URL's host), and must finish within ``MEGASR_WEBHOOK_TIMEOUT_S`` (default 5 s) for connect,
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
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import redis

from .contracts import JobRecord
from .webhook_http import HTTP_ERRORS, post
from .webhook_policy import (
    Resolver,
    check_webhook_url,
    checked_addresses,
    parse_webhook_url,
    resolve_host,
)

__all__ = [
    "DROPPED_KEY",
    "DUE_KEY",
    "ID_HEADER",
    "MAX_ATTEMPTS",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "WebhookDispatcher",
    "check_webhook_url",
    "circuit_id",
    "delivery_key",
    "payload",
    "schedule_in",
    "sign",
    "verify",
]

log = logging.getLogger("megasr.webhooks")
DUE_KEY = "megasr:webhooks:due"
PENDING_PREFIX = "megasr:webhooks:pending:"  # + tenant: a sorted set of its deliveries by scheduling time
GROWN_KEY = "megasr:webhooks:grown"  # tenants with new deliveries since the last backlog check
CIRCUIT_PREFIX = "megasr:webhooks:circuit:"  # + digest of (tenant, host): consecutive failures, open until
DROPPED_KEY = "megasr:webhooks:dropped"  # deliveries given up, by reason (backlog, attempts): a metric
SIGNATURE_HEADER = "X-MegaSR-Signature"
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
MAX_ATTEMPTS = 6
LEASE_SLACK_S = 30.0  # a claim outlives the delivery deadline by this much (DNS, Redis, scheduling)
SETTLE_RETRY_S = 0.5  # pause between tries to record an outcome while Redis is unreachable


def delivery_key(delivery_id: str) -> str:
    return f"megasr:webhook:{delivery_id}"


def circuit_id(tenant: str, url: str) -> str:
    """The circuit of a tenant's deliveries to the URL's host and port (a bounded Redis key part)."""
    try:
        target = parse_webhook_url(url)
        host = f"{target.host.lower()}:{target.port}"
    except ValueError:
        host = url
    return hashlib.sha256(f"{tenant}\0{host}".encode()).hexdigest()[:32]


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
    delivery_id, url, now = uuid.uuid4().hex, str(record.params.webhook_url), time.time()
    pipe.hset(
        delivery_key(delivery_id),
        mapping={
            "job_id": record.id,
            "url": url,
            "attempt": 0,
            "tenant": record.tenant,
            "circuit": circuit_id(record.tenant, url),
        },
    )
    pipe.zadd(DUE_KEY, {delivery_id: now + delay_s})
    pipe.zadd(PENDING_PREFIX + record.tenant, {delivery_id: now})
    pipe.sadd(GROWN_KEY, record.tenant)


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
        if public_url and record.status.value == "succeeded"
        else None,
    }
    return json.dumps(body, separators=(",", ":")).encode()


# Claim up to ARGV[3] deliveries due by ARGV[1]: each one's due time becomes ARGV[2], the end of the
# lease, so no other dispatcher takes it before then, and it is due again by itself if we die. Walks the
# due set in due order: a delivery whose circuit is open is moved to the circuit's reopening (no thread,
# no attempt); one of a tenant with ARGV[4] deliveries in flight here (ARGV[7..]: tenant, count pairs)
# is passed over; the walk stops after ARGV[5] were passed over. Returns id, tenant, circuit triples.
# (Keys beyond KEYS are named here: the deployment's Redis is one instance, not a cluster.)
CLAIM_SCRIPT = """
local now, lease_until, limit = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local cap, max_passed, circuit_prefix = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local in_flight = {}
for i = 7, #ARGV, 2 do
  in_flight[ARGV[i]] = tonumber(ARGV[i + 1])
end
local claimed, passed, examined = {}, 0, 0
while #claimed < 3 * limit and passed < max_passed and examined < 4 * max_passed + limit do
  local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', passed, 100)
  if #ids == 0 then
    break
  end
  for _, id in ipairs(ids) do
    examined = examined + 1
    local fields = redis.call('HMGET', KEYS[2] .. id, 'tenant', 'circuit')
    local tenant, circuit = fields[1] or '', fields[2] or ''
    local open_until = circuit ~= '' and tonumber(redis.call('HGET', circuit_prefix .. circuit, 'open_until'))
    if open_until and open_until > now then
      redis.call('ZADD', KEYS[1], 'XX', open_until, id)
    elseif (in_flight[tenant] or 0) >= cap then
      passed = passed + 1
    else
      redis.call('ZADD', KEYS[1], 'XX', lease_until, id)
      in_flight[tenant] = (in_flight[tenant] or 0) + 1
      table.insert(claimed, id)
      table.insert(claimed, tenant)
      table.insert(claimed, circuit)
    end
    if #claimed >= 3 * limit or passed >= max_passed then
      break
    end
  end
end
return claimed
"""

# Drop each grown tenant's newest deliveries over ARGV[1] (KEYS: due set, grown tenants, dropped counts;
# ARGV[2], ARGV[3]: pending and delivery key prefixes). Returns tenant, job id pairs of the dropped.
TRIM_SCRIPT = """
local cap = tonumber(ARGV[1])
local tenants = redis.call('SMEMBERS', KEYS[2])
redis.call('DEL', KEYS[2])
local dropped = {}
for _, tenant in ipairs(tenants) do
  local pending = ARGV[2] .. tenant
  if redis.call('ZCARD', pending) > cap then
    local ids = redis.call('ZRANGE', pending, cap, -1)
    for _, id in ipairs(ids) do
      table.insert(dropped, tenant)
      table.insert(dropped, redis.call('HGET', ARGV[3] .. id, 'job_id') or '')
      redis.call('ZREM', KEYS[1], id)
      redis.call('ZREM', pending, id)
      redis.call('DEL', ARGV[3] .. id)
    end
    redis.call('HINCRBY', KEYS[3], 'backlog', #ids)
  end
end
return dropped
"""

# A failed attempt that could not reach the host (KEYS: the circuit; ARGV: failures that open it, the
# reopening time, seconds the state is kept). Returns the consecutive failures so far.
CIRCUIT_FAILURE_SCRIPT = """
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if failures >= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'open_until', ARGV[2])
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return failures
"""

# Record an attempt's outcome (KEYS: due set, delivery hash, the tenant's pending set; ARGV: id, our lease
# end, 'done' or 'retry', attempt, next due time), only while our claim holds: once a lease ran out and
# another dispatcher took the delivery over, the outcome is that one's to record.
SETTLE_SCRIPT = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then
  return 0
end
if ARGV[3] == 'done' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[1])
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
    tenant: str = ""  # whose delivery (its in-flight count and pending set)
    circuit: str = ""  # :func:`circuit_id` of its tenant and host ("" for deliveries scheduled before #24)


class WebhookDispatcher:
    """Sends due deliveries on a bounded thread pool; safe to run in several processes at once."""

    def __init__(
        self,
        client: redis.Redis,
        jobs,
        secret: bytes,
        public_url: str | None = None,
        retry_base_s: float = 2.0,
        timeout_s: float = 5.0,
        concurrency: int = 8,
        allow_private: bool = False,
        resolve: Resolver = resolve_host,
        ssl_context: ssl.SSLContext | None = None,
        lease_slack_s: float = LEASE_SLACK_S,
        *,
        tenant_concurrency: int = 2,
        circuit_failures: int = 5,
        circuit_cooldown_s: float = 60.0,
        max_pending_per_tenant: int = 500,
    ) -> None:
        self.redis, self.jobs, self.secret = client, jobs, secret
        self.public_url, self.retry_base_s = public_url, retry_base_s
        self.timeout_s, self.concurrency, self.lease_slack_s = timeout_s, concurrency, lease_slack_s
        self.allow_private, self.resolve = allow_private, resolve
        self.tenant_concurrency, self.max_pending_per_tenant = tenant_concurrency, max_pending_per_tenant
        self.circuit_failures, self.circuit_cooldown_s = circuit_failures, circuit_cooldown_s
        self.ssl_context = ssl_context or httpx.create_ssl_context()
        self._claim_script = client.register_script(CLAIM_SCRIPT)
        self._settle_script = client.register_script(SETTLE_SCRIPT)
        self._trim_script = client.register_script(TRIM_SCRIPT)
        self._circuit_failure_script = client.register_script(CIRCUIT_FAILURE_SCRIPT)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="megasr-webhook")
        self._lock = threading.Lock()
        self._in_flight = 0
        self._tenants_in_flight: Counter[str] = Counter()
        self._stop = threading.Event()

    # -------------------------------------------------------------- claiming and scheduling

    def claim(self, limit: int, in_flight: Counter[str] | None = None) -> list[Claim]:
        """Atomically lease up to ``limit`` due deliveries to this dispatcher, none of a tenant that
        has ``tenant_concurrency`` in flight (``in_flight``: this process's count per tenant)."""
        if limit <= 0:
            return []
        now = time.time()
        lease_until = now + self.timeout_s + self.lease_slack_s
        # Only tenants at their cap are passed over: at most concurrency // cap of them, each with at most
        # max_pending deliveries, so every claimable delivery is reached within this many.
        max_passed = (self.concurrency // self.tenant_concurrency + 1) * self.max_pending_per_tenant
        counts = [item for tenant, count in (in_flight or {}).items() if count for item in (tenant, count)]
        raw = self._claim_script(
            keys=[DUE_KEY, delivery_key("")],
            args=[repr(now), repr(lease_until), limit, self.tenant_concurrency, max_passed, CIRCUIT_PREFIX, *counts],
        )
        fields = [item.decode() for item in raw]
        return [Claim(fields[i], lease_until, fields[i + 1], fields[i + 2]) for i in range(0, len(fields), 3)]

    def drop_backlog(self) -> int:
        """Drop the newest deliveries of tenants over ``max_pending_per_tenant``; returns how many."""
        raw = self._trim_script(
            keys=[DUE_KEY, GROWN_KEY, DROPPED_KEY], args=[self.max_pending_per_tenant, PENDING_PREFIX, delivery_key("")]
        )
        fields = [item.decode() for item in raw]
        for tenant, job_id in zip(fields[::2], fields[1::2]):
            log.warning(
                "webhook for job %s dropped: tenant %s has %d deliveries waiting (backlog cap)",
                job_id,
                tenant,
                self.max_pending_per_tenant,
            )
        return len(fields) // 2

    def dispatch_due(self, limit: int = 50) -> list[Future[bool]]:
        """Start due deliveries on the pool, no more than it has free threads (a claimed delivery
        never waits in a queue while its lease runs), fairly across tenants; returns at once."""
        self.drop_backlog()
        with self._lock:
            claims = self.claim(min(limit, self.concurrency - self._in_flight), self._tenants_in_flight)
            self._in_flight += len(claims)
            self._tenants_in_flight.update(claim.tenant for claim in claims)
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
                self._tenants_in_flight[claim.tenant] -= 1
                if self._tenants_in_flight[claim.tenant] <= 0:
                    del self._tenants_in_flight[claim.tenant]

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
        ok, reason, unreachable = self._send(claim.delivery_id, fields["url"], payload(record, self.public_url))
        if ok:
            self._settle(claim, "done")
        elif attempt >= MAX_ATTEMPTS:
            if self._settle(claim, "done"):
                self.redis.hincrby(DROPPED_KEY, "attempts", 1)
            log.warning("webhook for job %s dropped after %d attempts (%s)", record.id, attempt, reason)
        else:
            self._settle(claim, "retry", attempt, time.time() + self.retry_base_s * 2 ** (attempt - 1))
            log.info("webhook for job %s failed (%s); retry %d scheduled", record.id, reason, attempt)
        self._update_circuit(claim, fields["url"], ok, unreachable)
        return True

    def _update_circuit(self, claim: Claim, url: str, ok: bool, unreachable: bool) -> None:
        """A success closes the circuit of the delivery's tenant and host; a failure to reach the host
        counts towards opening it (after the outcome is recorded: this never causes a redelivery)."""
        if not claim.circuit or not (ok or unreachable):
            return
        key = CIRCUIT_PREFIX + claim.circuit
        try:
            if ok:
                self.redis.delete(key)
                return
            keep_s = int(self.circuit_cooldown_s) + 600  # forgotten 10 min after the last failure
            failures = self._circuit_failure_script(
                keys=[key], args=[self.circuit_failures, repr(time.time() + self.circuit_cooldown_s), keep_s]
            )
        except redis.RedisError as exc:
            log.warning("webhook circuit of delivery %s not updated: %s", claim.delivery_id, exc)
            return
        if int(failures) == self.circuit_failures:
            log.warning(
                "webhooks of tenant %s to %s: %d attempts in a row did not reach the host; its deliveries "
                "there are deferred for %.0f s at a time until one succeeds",
                claim.tenant,
                urlsplit(url).netloc.rpartition("@")[2],
                failures,
                self.circuit_cooldown_s,
            )

    def send(self, delivery_id: str, url: str, body: bytes) -> tuple[bool, str]:
        """POST ``body`` once: resolve and check the host now, connect to a checked address. The time
        spent resolving counts against the deadline (``getaddrinfo`` cannot be interrupted: a hanging
        resolver is bounded by its own timeout, and the claim's lease covers it). Returns (success, reason)."""
        ok, reason, _ = self._send(delivery_id, url, body)
        return ok, reason

    def _send(self, delivery_id: str, url: str, body: bytes) -> tuple[bool, str, bool]:
        """:meth:`send`, and whether a failure was the host's unreachability (what the circuit counts)."""
        started = time.monotonic()
        try:
            target = parse_webhook_url(url)
            addresses = checked_addresses(target, self.allow_private, self.resolve)
        except ValueError as exc:
            return False, str(exc), str(exc).endswith("does not resolve")
        left = self.timeout_s - (time.monotonic() - started)
        if left <= 0:
            return False, "deadline exceeded while resolving", True
        timestamp = int(time.time())
        headers = {
            "Host": target.authority,
            "Content-Type": "application/json",
            "User-Agent": "megasr-webhooks/1",
            ID_HEADER: delivery_id,
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(self.secret, timestamp, body),
        }
        try:
            response = post(url, addresses, headers, body, timeout_s=left, ssl_context=self.ssl_context)
        except HTTP_ERRORS as exc:
            return False, f"{type(exc).__name__}: {exc}", True
        return 200 <= response.status < 300, f"HTTP {response.status}", False

    def _settle(self, claim: Claim, outcome: str, attempt: int = 0, next_due: float = 0.0) -> bool:
        """Record the outcome; Redis errors are retried while the lease lasts (a restart must not turn a
        delivered webhook into a duplicate when the lease ends)."""
        while True:
            try:
                recorded = self._settle_script(
                    keys=[DUE_KEY, delivery_key(claim.delivery_id), PENDING_PREFIX + claim.tenant],
                    args=[claim.delivery_id, repr(claim.lease_until), outcome, attempt, repr(next_due)],
                )
                break
            except (redis.ConnectionError, redis.TimeoutError):  # BusyLoadingError (restarting) is one
                if time.time() + SETTLE_RETRY_S >= claim.lease_until:
                    raise
                time.sleep(SETTLE_RETRY_S)
        if not recorded:
            log.warning(
                "webhook delivery %s: lease ran out before the outcome (%s) was recorded", claim.delivery_id, outcome
            )  # pragma: no mutate
        return bool(recorded)

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
