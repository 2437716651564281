"""The RQ side of a job: enqueue the worker task by dotted path, queue position, cancel queued.

RQ keeps its own ``rq:`` keys; the job's RQ id is the MegaSR job id. The API never imports the
worker: the task is named by :data:`service.contracts.WORKER_TASK`. Every write here can go
into the caller's MULTI/EXEC transaction (``pipeline=``), so a job's record and its place in
RQ's queue change together or not at all (``service.jobsystem.lifecycle``). Jobs are stored as
JSON, never pickled (:class:`service.jobsystem.fair_queue.FairQueue`).
"""

from __future__ import annotations

import time

import redis
from redis.client import Pipeline
from rq import Retry
from rq.exceptions import NoSuchJobError
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from service.contracts import WORKER_TASK

from .fair_queue import FairQueue

#: retries for transient failures (storage down, CUDA out of memory); immediate, because the
#: task itself backs off before it re-raises (RQ's delayed retries need its scheduler process,
#: and a GPU worker must not fork)
RETRY = Retry(max=2)
SERIALIZER = JSONSerializer


class JobQueue:
    def __init__(self, client: redis.Redis, name: str, job_timeout_s: int) -> None:
        self.redis = client
        self.queue = FairQueue(name, connection=client, serializer=SERIALIZER)
        self.job_timeout_s = job_timeout_s

    @property
    def name(self) -> str:
        return self.queue.name

    @property
    def intermediate_key(self) -> str:
        """RQ's list of jobs a worker has popped but not yet started."""
        return IntermediateQueue.get_intermediate_queue_key(self.queue.key)

    @property
    def started_key(self) -> str:
        return StartedJobRegistry(self.queue.name, connection=self.redis).key

    def fetch(self, job_id: str) -> Job | None:
        try:
            return Job.fetch(job_id, connection=self.redis, serializer=SERIALIZER)
        except NoSuchJobError:
            return None

    def enqueue(self, job_id: str, tenant: str, pipeline: Pipeline | None = None, at_front: bool = False) -> None:
        """Queue the worker task for ``job_id``; inside ``pipeline``'s transaction when given."""
        if pipeline is None:
            with self.redis.pipeline() as pipe:
                self.enqueue(job_id, tenant, pipe, at_front)
                pipe.execute()
            return
        if not pipeline.explicit_transaction:
            pipeline.multi()
        self.queue.enqueue_call(
            WORKER_TASK,
            args=(job_id,),
            job_id=job_id,
            timeout=self.job_timeout_s,
            result_ttl=0,
            failure_ttl=24 * 3600,
            retry=RETRY,
            at_front=at_front,
            pipeline=pipeline,
        )
        self.queue.remember_tenant(pipeline, job_id, tenant)

    def requeue(self, job_id: str, tenant: str, pipeline: Pipeline, stale: Job | None) -> None:
        """Put a job back at the front (its attempt died or failed transiently): a fresh RQ job
        under the same id, replacing ``stale`` (fetched by the caller before its MULTI)."""
        self.discard(job_id, pipeline, stale)
        self.enqueue(job_id, tenant, pipeline=pipeline, at_front=True)

    def discard(self, job_id: str, pipeline: Pipeline, stale: Job | None) -> None:
        """Remove every RQ trace of ``job_id`` (queue lists, registries, its hash), in ``pipeline``."""
        if stale is not None:
            stale.delete(pipeline=pipeline)
        pipeline.delete(Job.key_for(job_id))
        pipeline.lrem(self.queue.key, 0, job_id)
        pipeline.lrem(self.intermediate_key, 0, job_id)
        self.queue.forget_tenant(pipeline, job_id)

    def claimed_by_rq(self, job_id: str, client: redis.Redis | Pipeline | None = None) -> bool:
        """Whether RQ holds the job: waiting in its list, popped by a worker, or being started.

        ``client`` may be a pipeline in WATCH mode (reads run at once).
        """
        client = client if client is not None else self.redis
        if client.lpos(self.queue.key, job_id) is not None or client.lpos(self.intermediate_key, job_id) is not None:
            return True
        return self.being_started(job_id, client)

    def being_started(self, job_id: str, client: redis.Redis | Pipeline | None = None) -> bool:
        """Whether a live worker has the job in RQ's started registry (its heartbeat not expired)."""
        client = client if client is not None else self.redis
        prefix = f"{job_id}:"
        live = client.zrangebyscore(self.started_key, time.time(), "+inf")
        return any(entry.decode().startswith(prefix) for entry in live)

    def popped_ids(self) -> set[str]:
        """A snapshot of the job ids RQ's workers have popped and not yet moved to started (and
        that are not waiting in the queue as well), in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.lrange(self.intermediate_key, 0, -1)
            pipe.lrange(self.queue.key, 0, -1)
            popped, waiting = pipe.execute()
        return {raw.decode() for raw in popped} - {raw.decode() for raw in waiting}

    def held_ids(self) -> set[str]:
        """A snapshot of every job id RQ holds (see :meth:`claimed_by_rq`), in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.lrange(self.queue.key, 0, -1)
            pipe.lrange(self.intermediate_key, 0, -1)
            pipe.zrangebyscore(self.started_key, time.time(), "+inf")
            waiting, popped, started = pipe.execute()
        return {raw.decode() for raw in (*waiting, *popped)} | {raw.decode().partition(":")[0] for raw in started}

    def waiting_ids(self, limit: int) -> list[str]:
        """The ids of the first ``limit`` jobs waiting in RQ's list, head first (a worker's batch scan)."""
        return [raw.decode() for raw in self.redis.lrange(self.queue.key, 0, limit - 1)]

    def position(self, job_id: str) -> int | None:
        """0-based position in the queue, or None when the job is not waiting.

        LPOS scans the list inside Redis; fetching the whole list (as RQ's helper does) makes
        every status call O(queue length) in Python. (With several tenants waiting, the fair
        dequeue may serve a job earlier than its position says.)
        """
        position = self.redis.lpos(self.queue.key, job_id)
        return None if position is None else int(position)

    def cancel_queued(self, job_id: str, pipeline: Pipeline) -> None:
        """Take a waiting job out of RQ's queue, in ``pipeline``'s transaction (with its record's
        change to canceled); a worker that popped it meanwhile finds no RQ job and skips it."""
        self.discard(job_id, pipeline, None)

    def depth(self) -> int:
        return self.queue.count
