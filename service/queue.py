"""The RQ side of a job: enqueue the worker task by dotted path, queue position, cancel queued.

RQ keeps its own ``rq:`` keys; the job's RQ id is the MegaSR job id. The API never imports the
worker: the task is named by :data:`service.contracts.WORKER_TASK`.
"""

from __future__ import annotations

import redis
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job

from .contracts import WORKER_TASK

#: retries for transient failures (storage down, CUDA out of memory); immediate, because the
#: task itself backs off before it re-raises (RQ's delayed retries need its scheduler process,
#: and a GPU worker must not fork)
RETRY = Retry(max=2)


class JobQueue:
    def __init__(self, client: redis.Redis, name: str, job_timeout_s: int) -> None:
        self.redis = client
        self.queue = Queue(name, connection=client)
        self.job_timeout_s = job_timeout_s

    @property
    def name(self) -> str:
        return self.queue.name

    def enqueue(self, job_id: str) -> None:
        self.queue.enqueue_call(
            WORKER_TASK, args=(job_id,), job_id=job_id, timeout=self.job_timeout_s,
            result_ttl=0, failure_ttl=24 * 3600, retry=RETRY,
        )

    def requeue(self, job_id: str) -> None:
        """Put a job back at the front (its worker died); a fresh RQ job under the same id."""
        try:
            Job.fetch(job_id, connection=self.redis).delete()
        except NoSuchJobError:
            pass
        self.queue.enqueue_call(
            WORKER_TASK, args=(job_id,), job_id=job_id, timeout=self.job_timeout_s,
            result_ttl=0, failure_ttl=24 * 3600, retry=RETRY, at_front=True,
        )

    def position(self, job_id: str) -> int | None:
        """0-based position in the queue, or None when the job is not waiting.

        LPOS scans the list inside Redis; fetching the whole list (as RQ's helper does) makes
        every status call O(queue length) in Python.
        """
        position = self.redis.lpos(self.queue.key, job_id)
        return None if position is None else int(position)

    def cancel_queued(self, job_id: str) -> None:
        try:
            Job.fetch(job_id, connection=self.redis).cancel()
        except (NoSuchJobError, InvalidJobOperation):
            pass

    def depth(self) -> int:
        return self.queue.count
