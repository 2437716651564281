"""Token buckets in Redis: per-tenant request rate and per-client failed authentications.

A bucket holds up to ``capacity`` tokens and refills continuously at ``per_minute / 60`` tokens a
second; a request takes one. Unlike a counter per clock minute, a client cannot spend a whole
minute's allowance at 12:00:59 and again at 12:01:00. The refill and the take are one Lua script,
so concurrent API replicas never both spend the last token, and the clock is Redis's own
(``TIME``), so replicas with skewed clocks agree. Tests may pass ``now`` instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis

# KEYS[1]: the bucket (a hash: tokens, ts).  ARGV: refill per second, capacity, cost, now ('' = Redis TIME).
# cost 0 only asks whether a token is there. Returns {allowed, seconds until enough tokens, tokens left}
# as strings: Lua numbers would be truncated to integers on the way back.
_TAKE = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
end
if now > ts then
  tokens = math.min(capacity, tokens + (now - ts) * rate)
  ts = now
end
local need = math.max(cost, 1)
local allowed = tokens >= need
if allowed and cost > 0 then
  tokens = tokens - cost
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', string.format('%.17g', ts))
  redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
end
local wait = 0
if not allowed then
  wait = (need - tokens) / rate
end
return {allowed and 1 or 0, string.format('%.17g', wait), string.format('%.17g', tokens)}
"""


@dataclass(frozen=True)
class Decision:
    """Whether a take succeeded and, if not, how long until it would."""

    allowed: bool
    retry_after_s: float
    tokens_left: float

    @property
    def retry_after_header(self) -> str:
        """Whole seconds for ``Retry-After``, rounded up: retrying then finds a token."""
        return str(max(1, math.ceil(self.retry_after_s)))


class TokenBucket:
    """Buckets named ``<prefix>:<subject>`` that hold ``capacity`` tokens and refill ``per_minute``."""

    def __init__(self, client: redis.Redis, prefix: str, per_minute: float, capacity: int) -> None:
        if per_minute <= 0 or capacity < 1:
            raise ValueError("a token bucket needs a positive refill rate and room for at least one token")
        self.prefix, self.rate_per_s, self.capacity = prefix, per_minute / 60.0, capacity
        self._take = client.register_script(_TAKE)

    def key(self, subject: str) -> str:
        return f"{self.prefix}:{subject}"

    def take(self, subject: str, cost: int = 1, now: float | None = None) -> Decision:
        """Take ``cost`` tokens if they are all there (nothing is taken otherwise)."""
        allowed, wait, tokens = self._take(
            keys=[self.key(subject)],
            args=[repr(self.rate_per_s), self.capacity, cost, "" if now is None else repr(now)],
        )
        return Decision(bool(int(allowed)), float(wait), float(tokens))

    def peek(self, subject: str, now: float | None = None) -> Decision:
        """Whether a token is there, taking none."""
        return self.take(subject, cost=0, now=now)
