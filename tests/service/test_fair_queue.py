"""The queue's dequeue order across tenants and its job encoding, against a real Valkey with RQ."""

from __future__ import annotations

import json
import pickle
import threading
import time
import uuid
import zlib

import pytest
import redis
from fastapi.testclient import TestClient
from rq import Queue
from rq.worker import SimpleWorker

from service.app import create_app
from service.jobsystem.fair_queue import FairQueue
from service.jobsystem.keys import fair_tenants_key
from service.jobsystem.queue import SERIALIZER, JobQueue
from tests.service.helpers import make_settings, submit
from worker.main import make_worker


@pytest.fixture()
def queue(db_url):
    client = redis.Redis.from_url(db_url)
    yield JobQueue(client, f"fair-{uuid.uuid4().hex[:6]}", job_timeout_s=60)
    client.close()


def dequeue_all(queue: JobQueue) -> list[str]:
    """Job ids in the order workers get them (RQ's own dequeue, through FairQueue)."""
    order = []
    while result := FairQueue.dequeue_any([queue.queue], None, connection=queue.redis, serializer=SERIALIZER):
        order.append(result[0].id)
    return order


def test_a_tenant_with_two_jobs_is_served_within_the_first_four_behind_ten_of_another(queue):
    a_jobs = [f"a{i}" for i in range(10)]
    b_jobs = ["b0", "b1"]
    for job_id in a_jobs:
        queue.enqueue(job_id, "tenant-a")
    for job_id in b_jobs:
        queue.enqueue(job_id, "tenant-b")
    order = dequeue_all(queue)
    assert sorted(order) == sorted(a_jobs + b_jobs)  # every job exactly once
    assert set(b_jobs) <= set(order[:4]), order
    assert [j for j in order if j.startswith("a")] == a_jobs  # each tenant's own jobs stay in order
    assert queue.redis.hlen(fair_tenants_key(queue.queue.key)) == 0  # nothing left behind per job


def test_tenants_alternate_and_a_front_requeue_stays_first_for_its_tenant(queue):
    for i in range(3):
        queue.enqueue(f"a{i}", "tenant-a")
        queue.enqueue(f"b{i}", "tenant-b")
    queue.enqueue("c0", "tenant-c")
    queue.enqueue("a-retry", "tenant-a", at_front=True)  # a job whose worker died
    assert dequeue_all(queue) == ["a-retry", "b0", "c0", "a0", "b1", "a1", "b2", "a2"]  # least recently served first


def test_an_empty_queue_blocks_until_a_job_arrives(queue):
    later = threading.Timer(0.3, lambda: queue.enqueue("late", "tenant-a"))
    later.start()
    started = time.monotonic()
    job, _ = FairQueue.dequeue_any([queue.queue], 5, connection=queue.redis, serializer=SERIALIZER)
    assert job.id == "late" and 0.2 < time.monotonic() - started < 4
    assert queue.redis.hlen(fair_tenants_key(queue.queue.key)) == 0


def test_the_api_stores_rq_jobs_as_json_never_pickle(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url)
    with TestClient(create_app(settings)) as client:
        job_id = submit(client, steps=2).json()["id"]
        raw = client.app.state.services.redis.hget(f"rq:job:{job_id}", "data")
    data = zlib.decompress(raw)
    assert not data.startswith(b"\x80")  # pickle's protocol marker
    assert json.loads(data) == ["worker.tasks.upscale", None, [job_id], {}]


class LeavesAMark:
    """What a Redis writer could smuggle into a pickled job: unpickling it runs code."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickled_job_written_to_redis_is_never_unpickled_by_a_worker(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url)
    connection = redis.Redis.from_url(db_url)
    mark = tmp_path / "pwned"
    # A writer with Redis access enqueues a pickle-serialized job on the workers' queue.
    Queue(settings.queue_name, connection=connection).enqueue_call("builtins.print", args=(LeavesAMark(mark),))
    assert pickle.loads(pickle.dumps(LeavesAMark(tmp_path / "probe"))) and (tmp_path / "probe").exists()
    make_worker(SimpleWorker, connection, settings.queue_name).work(burst=True)
    assert not mark.exists()
    connection.close()
