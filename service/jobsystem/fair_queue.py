"""An RQ queue that serves tenants in turn instead of strictly first-come, and stores jobs as JSON.

RQ pops the head of one Redis list, so a tenant that queues a thousand jobs makes every other
tenant wait behind all of them. :class:`FairQueue` keeps RQ's list (positions, ``at_front``
re-queues and batching still work on it) but its dequeue picks, among the first
:data:`SCAN_DEPTH` entries, the job of the tenant served least recently, in one Lua script
(atomic against every other worker). It needs two small hashes next to RQ's keys: the tenant
of every queued job (written by :meth:`remember_tenant`, in the enqueue's transaction) and
when each tenant was last served. With the queue empty it falls back to RQ's blocking pop.

Jobs are serialized with RQ's JSON serializer on both sides (API and workers): a pickled job
is code, and anyone able to write to Redis could run it in a worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis import Redis
from redis.client import Pipeline
from rq import Queue
from rq.serializers import JSONSerializer

from .keys import fair_clock_key, fair_served_key, fair_tenants_key

#: how many queued entries one dequeue looks at to pick the next tenant
SCAN_DEPTH = 100

# KEYS: queue list, destination list ('' = none), job → tenant hash, tenant → last served, served counter
# ARGV: scan depth. Returns the job id taken, or false when the queue is empty.
_FAIR_POP = """
local ids = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #ids == 0 then return false end
local best, best_tenant, best_served
for _, id in ipairs(ids) do
  local tenant = redis.call('HGET', KEYS[3], id) or ''
  local served = tonumber(redis.call('HGET', KEYS[4], tenant) or '0')
  if best == nil or served < best_served then
    best, best_tenant, best_served = id, tenant, served
  end
end
redis.call('HSET', KEYS[4], best_tenant, redis.call('INCR', KEYS[5]))
redis.call('LREM', KEYS[1], 1, best)
redis.call('HDEL', KEYS[3], best)
if KEYS[2] ~= '' then redis.call('RPUSH', KEYS[2], best) end
return best
"""


def _fair_pop(connection: Redis, queue_key: str, destination: str | None) -> bytes | None:
    script = connection.register_script(_FAIR_POP)
    return script(
        keys=[
            queue_key,
            destination or "",
            fair_tenants_key(queue_key),
            fair_served_key(queue_key),
            fair_clock_key(queue_key),
        ],
        args=[SCAN_DEPTH],
    )


class FairQueue(Queue):
    """RQ's queue with a round-robin dequeue across tenants and the JSON serializer by default."""

    def __init__(self, name: str = "default", *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("serializer", JSONSerializer)
        super().__init__(name, *args, **kwargs)

    def remember_tenant(self, pipe: Pipeline | Redis, job_id: str, tenant: str) -> None:
        """Record whose job this is (call in the transaction that enqueues it)."""
        pipe.hset(fair_tenants_key(self.key), job_id, tenant)

    def forget_tenant(self, pipe: Pipeline | Redis, job_id: str) -> None:
        pipe.hdel(fair_tenants_key(self.key), job_id)

    @classmethod
    def lmove(cls, connection: Redis, queue_key: str, timeout: int | None):
        """RQ's single-queue dequeue (into its intermediate list), tenant-fair when work is waiting."""
        from rq.intermediate_queue import IntermediateQueue

        job_id = _fair_pop(connection, queue_key, IntermediateQueue.get_intermediate_queue_key(queue_key))
        if job_id is not None:
            return queue_key, job_id
        result = super().lmove(connection, queue_key, timeout)  # empty: block until a job arrives
        if result is not None:
            connection.hdel(fair_tenants_key(queue_key), result[1])
        return result

    @classmethod
    def lpop(cls, queue_keys: Sequence[str], timeout: int | None, connection: Redis | None = None):
        """RQ's multi-queue dequeue: queues in priority order, tenant-fair within each."""
        assert connection is not None
        for queue_key in queue_keys:
            job_id = _fair_pop(connection, queue_key, None)
            if job_id is not None:
                return queue_key, job_id
        result = super().lpop(queue_keys, timeout, connection=connection)
        if result is not None:
            popped_from = result[0].decode() if isinstance(result[0], bytes) else result[0]
            connection.hdel(fair_tenants_key(popped_from), result[1])
        return result
