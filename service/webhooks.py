"""Webhooks: on a job's final status, POST its JSON to ``webhook_url``, signed, with retries.

The delivery is written to Redis in the same transaction as the final status, so a crash
cannot lose it; a dispatcher thread (in every worker and in ``megasr serve``) sends due
deliveries, so the worker never waits on a client's server. Failed deliveries are retried with
exponential backoff (``base · 2^attempt`` seconds, :data:`MAX_ATTEMPTS` tries).

Signature: header ``X-MegaSR-Signature: t=<unix time>,v1=<hex>`` where ``hex`` is
HMAC-SHA256(``MEGASR_WEBHOOK_SECRET``, ``"<t>." + body``). Receivers recompute it and reject
old timestamps (:func:`verify` does both).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from urllib.parse import urlparse

import httpx
import redis

from .contracts import JobRecord

log = logging.getLogger("megasr.webhooks")
DUE_KEY = "megasr:webhooks:due"
SIGNATURE_HEADER = "X-MegaSR-Signature"
MAX_ATTEMPTS = 6


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


def check_webhook_url(url: str, allow_private: bool) -> None:
    """Refuse URLs that point into the service's own network (unless explicitly allowed)."""
    host = urlparse(url).hostname or ""
    if allow_private:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        raise ValueError(f"webhook_url host {host!r} does not resolve") from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast:
            raise ValueError("webhook_url must point to a public address")


def schedule_in(pipe: redis.client.Pipeline, record: JobRecord, delay_s: float = 0.0) -> None:
    """Add a delivery for ``record`` to a Redis transaction (called with the final transition)."""
    delivery_id = uuid.uuid4().hex
    pipe.hset(delivery_key(delivery_id), mapping={"job_id": record.id, "url": str(record.params.webhook_url), "attempt": 0})
    pipe.zadd(DUE_KEY, {delivery_id: time.time() + delay_s})


def payload(record: JobRecord, public_url: str | None) -> bytes:
    body = {
        "id": record.id,
        "status": record.status.value,
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


class WebhookDispatcher:
    """Sends due deliveries; safe to run in several processes at once (claims are atomic)."""

    def __init__(self, client: redis.Redis, jobs, secret: bytes, public_url: str | None = None,
                 retry_base_s: float = 2.0, timeout_s: float = 5.0) -> None:
        self.redis, self.jobs, self.secret = client, jobs, secret
        self.public_url, self.retry_base_s = public_url, retry_base_s
        self.http = httpx.Client(timeout=timeout_s, follow_redirects=False)
        self._stop = threading.Event()

    def deliver_due(self, limit: int = 50) -> int:
        """Try every delivery that is due now; returns how many were attempted."""
        attempted = 0
        for raw_id in self.redis.zrangebyscore(DUE_KEY, "-inf", time.time(), start=0, num=limit):
            if not self.redis.zrem(DUE_KEY, raw_id):
                continue  # another dispatcher claimed it
            delivery_id = raw_id.decode()
            fields = {k.decode(): v.decode() for k, v in self.redis.hgetall(delivery_key(delivery_id)).items()}
            record = self.jobs.get(fields.get("job_id", ""))
            if record is None:
                self.redis.delete(delivery_key(delivery_id))
                continue
            attempted += 1
            attempt = int(fields.get("attempt", 0)) + 1
            body = payload(record, self.public_url)
            headers = {"Content-Type": "application/json", "User-Agent": "megasr-webhooks/1",
                       SIGNATURE_HEADER: sign(self.secret, int(time.time()), body)}
            try:
                response = self.http.post(fields["url"], content=body, headers=headers)
                ok = 200 <= response.status_code < 300
                reason = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                ok, reason = False, type(exc).__name__
            if ok:
                self.redis.delete(delivery_key(delivery_id))
            elif attempt >= MAX_ATTEMPTS:
                self.redis.delete(delivery_key(delivery_id))
                log.warning("webhook for job %s dropped after %d attempts (%s)", record.id, attempt, reason)
            else:
                self.redis.hset(delivery_key(delivery_id), "attempt", attempt)
                self.redis.zadd(DUE_KEY, {delivery_id: time.time() + self.retry_base_s * 2 ** (attempt - 1)})
                log.info("webhook for job %s failed (%s); retry %d scheduled", record.id, reason, attempt)
        return attempted

    def start(self, interval_s: float = 0.5) -> threading.Thread:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.deliver_due()
                except Exception as exc:  # never let a bad delivery stop the thread
                    log.warning("webhook dispatcher: %s", exc)

        thread = threading.Thread(target=loop, name="megasr-webhooks", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
