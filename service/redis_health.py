"""Whether Redis keeps its data across a restart, said once at start-up and on every scrape.

Accepted jobs live only in Redis: a Redis with neither AOF (``appendonly``) nor RDB snapshots
(``save``) loses every queued job, record and quota on a restart, silently. The API warns at
start-up and exports ``megasr_redis_persistence_enabled`` (1 or 0; absent while unknown).

Managed Redis services often disable ``CONFIG``: then ``INFO persistence`` still tells whether
AOF is on, but not whether snapshots are configured, so without AOF the answer is unknown, and
start-up goes on either way.
"""

from __future__ import annotations

import logging

import redis

log = logging.getLogger("megasr.api")


def redis_persistence(client: redis.Redis) -> bool | None:
    """True with AOF or RDB snapshots on, False with neither, None when Redis cannot say (or is down)."""
    try:
        appendonly = client.config_get("appendonly").get("appendonly", "")
        save = client.config_get("save").get("save", "")
        return str(appendonly).lower() == "yes" or bool(str(save).strip())
    except redis.exceptions.ResponseError:  # CONFIG disabled or renamed (managed Redis)
        pass
    except redis.exceptions.RedisError:
        return None
    try:
        aof = int(client.info("persistence").get("aof_enabled", 0))
    except (redis.exceptions.RedisError, ValueError, TypeError):
        return None
    return True if aof else None


def warn_without_persistence(client: redis.Redis) -> bool | None:
    """Log (a warning when off) whether Redis persists its data; never fails start-up."""
    persisted = redis_persistence(client)
    if persisted is False:
        log.warning(
            "Redis has neither AOF (appendonly) nor RDB snapshots (save): accepted jobs are lost "
            "if Redis restarts; turn on appendonly (see docs/workers.md, Redis persistence)"
        )
    elif persisted is None:
        log.info("Redis persistence: unknown (CONFIG is not available, or Redis is not reachable yet)")
    return persisted
