"""Atomic job state against a real Valkey: the quota under concurrency, idempotency bound to the
request, and fault injection — a simulated process death at every step of every multi-step path,
then the sweeper, then the job must be consistent (queued and in RQ's queue, or finished) and
its quota slot released once it finishes."""

from __future__ import annotations

import io
import threading
import uuid

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from rq.worker import SimpleWorker

from service import faults
from service.app import create_app
from service.contracts import JobRecord, JobStatus, UpscaleParams
from service.jobsystem.keys import RUNNING_KEY
from service.jobsystem.services import build_services
from service.jobsystem.store import JobStore, QuotaExceeded
from service.jobsystem.sweeper import sweep
from tests.service.helpers import StandIn, admit, make_settings, png, submit
from worker import tasks
from worker.main import make_worker
from worker.runtime import install_runtime

QUOTA = 5


# ------------------------------------------------------------------ quota under concurrency


def test_twelve_concurrent_submissions_against_a_quota_of_five_accept_exactly_five(tmp_path, db_url):
    """Through the HTTP API, all at once: the quota check and the insert are one transaction."""
    settings = make_settings(tmp_path, db_url, max_queued_per_tenant=QUOTA)
    image = png()
    start = threading.Barrier(12)
    statuses: list[int] = []
    with TestClient(create_app(settings)) as client:

        def one() -> None:
            start.wait()
            statuses.append(submit(client, image=image, steps=2).status_code)

        threads = [threading.Thread(target=one) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        services = client.app.state.services
        assert sorted(statuses) == [202] * QUOTA + [429] * 7
        assert services.jobs.active_count("default") == QUOTA
        assert services.queue.depth() == QUOTA  # every accepted job is in RQ's queue, no other


def test_the_store_alone_never_overshoots_the_quota_under_contention(db_url):
    """Twelve JobStores (connections) racing on one tenant's quota set: exactly five records."""
    start = threading.Barrier(12)
    outcomes: list[str] = []

    def one() -> None:
        client = redis.Redis.from_url(db_url)
        job_id = uuid.uuid4().hex
        record = JobRecord(
            id=job_id,
            tenant="racer",
            params=UpscaleParams(),
            input_key=f"jobs/{job_id}/input",
            input_width=8,
            input_height=8,
        )
        start.wait()
        try:
            JobStore(client).create(record, max_active=QUOTA)
            outcomes.append("created")
        except QuotaExceeded as refused:
            outcomes.append(
                "quota"
                if (refused.limit, str(refused)) == (QUOTA, f"{QUOTA} unfinished jobs already")
                else f"quota error {refused.limit!r}: {refused}"
            )
        finally:
            client.close()

    threads = [threading.Thread(target=one) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert outcomes.count("created") == QUOTA and outcomes.count("quota") == 7
    assert JobStore(redis.Redis.from_url(db_url)).active_count("racer") == QUOTA


# ------------------------------------------------------------------ idempotency bound to the request


def test_an_idempotency_key_replays_only_the_same_request(tmp_path, db_url):
    """Same key + same image and parameters → the first job (Idempotent-Replayed); another image
    or other parameters → 422 idempotency_mismatch, and nothing new is queued."""
    settings = make_settings(tmp_path, db_url)
    with TestClient(create_app(settings)) as client:
        headers = {"Idempotency-Key": "order-7"}
        first = submit(client, image=png(24, 16), headers=headers, steps=2, seed=1)
        assert first.status_code == 202 and "idempotent-replayed" not in first.headers
        same = submit(client, image=png(24, 16), headers=headers, steps=2, seed=1)
        assert same.status_code == 202 and same.headers["idempotent-replayed"] == "true"
        assert same.json()["id"] == first.json()["id"]
        # the defaults spelled out are the same request
        spelled = submit(client, image=png(24, 16), headers=headers, steps=2, seed=1, scale=4)
        assert spelled.status_code == 202 and spelled.json()["id"] == first.json()["id"]
        for different in (
            submit(client, image=png(24, 18), headers=headers, steps=2, seed=1),
            submit(client, image=png(24, 16), headers=headers, steps=3, seed=1),
        ):
            assert different.status_code == 422, different.text
            assert different.json()["error"]["code"] == "idempotency_mismatch"
        assert client.app.state.services.queue.depth() == 1


def test_a_mismatch_found_inside_the_create_transaction_is_refused(store):
    """The race: the key appeared between the route's look-up and the insert, for another request."""
    from service.jobsystem.store import IdempotencyMismatch

    def record() -> JobRecord:
        job_id = uuid.uuid4().hex
        return JobRecord(
            id=job_id,
            tenant="t",
            params=UpscaleParams(),
            input_key=f"jobs/{job_id}/input",
            input_width=8,
            input_height=8,
        )

    first, created = store.create(record(), "k", request_hash="a" * 64)
    again, created_again = store.create(record(), "k", request_hash="a" * 64)
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyMismatch):
        store.create(record(), "k", request_hash="b" * 64)
    assert store.active_count("t") == 1


# ------------------------------------------------------------------ fault injection


class DyingWorker(SimpleWorker):
    """A worker whose process 'dies' at a :class:`faults.Crash`: RQ's failure bookkeeping (its
    retry, the registries) never runs, as after a SIGKILL."""

    def _finalize_failure(self, job, queue, execution, exc_info):
        if isinstance(exc_info[1], faults.Crash):
            raise exc_info[1]
        return super()._finalize_failure(job, queue, execution, exc_info)


@pytest.fixture()
def system(tmp_path, db_url, monkeypatch):
    monkeypatch.setattr(tasks, "RETRY_BACKOFF_S", 0.0)
    settings = make_settings(tmp_path, db_url, max_queued_per_tenant=QUOTA)
    services = build_services(settings)
    return settings, services


def work(settings, services, pipeline, worker_class=SimpleWorker) -> None:
    install_runtime(settings, pipeline, services=services)
    make_worker(worker_class, services.redis, settings.queue_name).work(burst=True)


def dead_worker_is_noticed(services, job_id: str) -> None:
    """What time does after a worker's death: its lease runs out and RQ's heartbeat of the job too."""
    services.redis.delete(services.jobs.lease_key(job_id))
    started = services.queue.started_key
    for entry in services.redis.zrange(started, 0, -1):
        services.redis.zadd(started, {entry: 0})


def assert_consistent(services, job_id: str) -> JobRecord:
    """Queued and held by RQ, or final with nothing held; never stuck in between."""
    jobs, r = services.jobs, services.redis
    record = jobs.get(job_id)
    assert record is not None
    if record.status.is_final:
        assert not r.sismember(jobs.active_key(record.tenant), job_id)
    else:
        assert record.status == JobStatus.queued, record
        assert services.queue.claimed_by_rq(job_id), "queued but RQ does not hold it"
        assert r.sismember(jobs.active_key(record.tenant), job_id)
    assert not r.exists(jobs.lease_key(job_id)) and not r.sismember(RUNNING_KEY, job_id)
    return record


def finishes_normally(settings, services, job_id: str) -> None:
    """After the repair the job runs to the end and gives its quota slot back."""
    work(settings, services, StandIn("blue"))
    record = assert_consistent(services, job_id)
    assert record.status == JobStatus.succeeded, record
    assert services.jobs.active_count("default") == 0
    assert Image.open(io.BytesIO(services.storage.get(record.output_key))).getpixel((0, 0)) == (0, 0, 255)


def test_crash_inside_admission_leaves_nothing_half_made(system):
    """Step killed: admission's transaction (quota + record + idempotency key + RQ enqueue), before EXEC."""
    settings, services = system
    with faults.crash_at("create:exec"), pytest.raises(faults.Crash):
        admit(services)
    assert faults.reached == ["create:exec"]
    assert services.jobs.active_count("default") == 0 and services.queue.depth() == 0
    assert not list(services.redis.scan_iter("megasr:job:*"))
    assert sweep(services).ids() == []


@pytest.mark.parametrize(
    "step, pipeline",
    [
        # the start transaction (running + lease + running set), killed before EXEC
        ("start:exec", StandIn()),
        # started (running, leased), then the process dies before running the batch
        ("task:after_start", StandIn()),
        # the result is in storage, the process dies before the finish transaction
        ("task:after_output", StandIn()),
        # the finish transaction (final state + releases), killed before EXEC
        ("finish:exec", StandIn()),
        # a transient error: the retry's requeue transaction (queued + lease dropped), killed before EXEC
        ("requeue:exec", StandIn(error=RuntimeError("flaky"))),
        # the record is queued again, the process dies before RQ's Retry re-pushes the job
        ("task:after_requeue", StandIn(error=RuntimeError("flaky"))),
    ],
)
def test_a_worker_killed_at_each_step_leaves_a_job_the_sweeper_repairs(system, step, pipeline):
    settings, services = system
    job_id = admit(services)
    with faults.crash_at(step):
        work(settings, services, pipeline, worker_class=DyingWorker)
    assert faults.reached == [step]
    dead_worker_is_noticed(services, job_id)
    report = sweep(services)
    assert job_id in report.ids() or services.queue.claimed_by_rq(job_id)
    record = assert_consistent(services, job_id)
    assert record.status == JobStatus.queued
    assert services.queue.depth() == 1  # in RQ's queue exactly once
    assert sweep(services).ids() == []  # nothing left to repair
    finishes_normally(settings, services, job_id)


def test_the_reaper_or_sweeper_killed_mid_repair_is_repaired_by_the_next_pass(system):
    """Step killed: the sweeper's requeue transaction (queued + no lease + RQ re-enqueue), before EXEC."""
    settings, services = system
    job_id = admit(services)
    with faults.crash_at("task:after_start"):
        work(settings, services, StandIn(), worker_class=DyingWorker)
    dead_worker_is_noticed(services, job_id)
    with faults.crash_at("requeue:exec"), pytest.raises(faults.Crash):
        sweep(services)
    assert services.jobs.get(job_id).status == JobStatus.running  # nothing of the half repair landed
    assert sweep(services).requeued == [job_id]
    assert_consistent(services, job_id)
    # The dead attempt's RQ job left RQ's started registry with it: an expired entry left behind would make
    # RQ's registry cleanup fail the fresh job that now carries the same id.
    started = [entry.decode() for entry in services.redis.zrange(services.queue.started_key, 0, -1)]
    assert not [entry for entry in started if entry.startswith(job_id)]
    finishes_normally(settings, services, job_id)


def test_a_queued_job_rq_lost_is_enqueued_again(system):
    """RQ's job vanished (a flush, a worker that died between popping and starting, once RQ gave
    up on it): the sweeper enqueues the job again; killed inside that transaction, the next pass does."""
    settings, services = system
    job_id = admit(services)
    services.redis.delete(services.queue.queue.key)
    with faults.crash_at("sweep:exec"), pytest.raises(faults.Crash):
        sweep(services)
    assert not services.queue.claimed_by_rq(job_id)
    assert sweep(services).enqueued == [job_id]
    assert_consistent(services, job_id)
    finishes_normally(settings, services, job_id)


def test_quota_slots_of_finished_or_vanished_jobs_are_released(system):
    """A slot whose record is final or gone (expired, deleted by hand) is given back."""
    settings, services = system
    gone, done = admit(services), admit(services)
    services.redis.delete(services.jobs.key(gone))
    raw = services.jobs.get(done).model_copy(update={"status": JobStatus.succeeded}).model_dump_json()
    services.redis.set(services.jobs.key(done), raw)  # final, but its slot was never released
    assert services.jobs.active_count("default") == 2
    assert sorted(sweep(services).released) == sorted([gone, done])
    assert services.jobs.active_count("default") == 0


def test_a_cancel_killed_inside_its_transaction_leaves_the_job_queued(system):
    """Step killed: the API's cancel of a queued job (canceled + out of RQ's queue), before EXEC.
    (The route is called as a function: a simulated death cannot travel through the ASGI stack.)"""
    from starlette.requests import Request

    from service.app import create_app
    from service.routes.jobs import cancel_job

    settings, services = system
    request = Request({"type": "http", "app": create_app(settings), "root_path": "", "headers": []})
    job_id = admit(services)
    with faults.crash_at("finish:exec"), pytest.raises(faults.Crash):
        cancel_job(job_id, request, services, "default")
    assert services.jobs.get(job_id).status == JobStatus.queued
    assert_consistent(services, job_id)
    assert services.queue.depth() == 1
    canceled = cancel_job(job_id, request, services, "default")
    assert canceled.status_code == 200
    assert assert_consistent(services, job_id).status == JobStatus.canceled
    assert services.queue.depth() == 0 and not services.queue.claimed_by_rq(job_id)
    assert services.jobs.active_count("default") == 0


def test_the_reaper_pass_runs_the_sweeper_at_most_every_interval(system):
    """Every worker's reaper loop sweeps too, but one sweep per SWEEP_INTERVAL_S across processes."""
    from service.jobsystem.keys import REAPER_LOCK_KEY, SWEEP_LOCK_KEY
    from service.jobsystem.reaper import reap_abandoned
    from service.jobsystem.sweeper import SWEEP_INTERVAL_S

    settings, services = system
    first, second = admit(services), admit(services)
    services.redis.lrem(services.queue.queue.key, 0, first)  # RQ lost it
    assert reap_abandoned(services) == [first]
    assert 0 < services.redis.ttl(SWEEP_LOCK_KEY) <= SWEEP_INTERVAL_S
    services.redis.lrem(services.queue.queue.key, 0, second)
    services.redis.delete(REAPER_LOCK_KEY)
    assert reap_abandoned(services) == []  # within the interval: no sweep
    services.redis.delete(REAPER_LOCK_KEY, SWEEP_LOCK_KEY)
    assert reap_abandoned(services) == [second]
    for job_id in (first, second):
        assert_consistent(services, job_id)


def test_a_job_popped_by_a_worker_that_died_before_starting_it_is_enqueued_again(system):
    """Killed between RQ's pop (the job id moves to RQ's list of popped jobs) and the job's start: the
    record stays queued and RQ's queue no longer lists it. Once it has been popped and unstarted for
    the grace period (a live worker starts within milliseconds), the sweeper puts it back; the soak
    met this once, a job submitted the moment a worker was SIGKILLed."""
    from service.jobsystem.keys import POPPED_SEEN_KEY
    from service.jobsystem.sweeper import POPPED_GRACE_S

    settings, services = system
    job_id = admit(services)
    queue, r = services.queue, services.redis
    r.lrem(queue.queue.key, 0, job_id)  # RQ's pop, as a worker does it
    r.rpush(queue.intermediate_key, job_id)
    assert services.jobs.get(job_id).status == JobStatus.queued and queue.depth() == 0
    assert sweep(services).ids() == []  # within the grace period: a live worker may be starting it
    assert r.hexists(POPPED_SEEN_KEY, job_id)
    first = float(r.hget(POPPED_SEEN_KEY, job_id))
    r.hset(POPPED_SEEN_KEY, job_id, first - POPPED_GRACE_S - 1)  # the grace period has passed
    assert sweep(services).enqueued == [job_id]
    assert r.lpos(queue.intermediate_key, job_id) is None and queue.depth() == 1
    assert not r.hexists(POPPED_SEEN_KEY, job_id)
    assert_consistent(services, job_id)
    assert sweep(services).ids() == []
    finishes_normally(settings, services, job_id)


def test_a_popped_job_that_starts_is_left_alone_and_forgotten(system):
    from service.jobsystem.keys import POPPED_SEEN_KEY

    settings, services = system
    job_id = admit(services)
    queue, r = services.queue, services.redis
    r.lrem(queue.queue.key, 0, job_id)
    r.rpush(queue.intermediate_key, job_id)
    sweep(services)
    r.hset(POPPED_SEEN_KEY, job_id, 0)  # long ago, but the worker is alive: it starts the job now
    services.jobs.start(job_id, "worker-a:1")
    r.lrem(queue.intermediate_key, 0, job_id)
    assert job_id not in sweep(services).ids()
    assert not r.hexists(POPPED_SEEN_KEY, job_id)  # no longer popped and unstarted: forgotten
