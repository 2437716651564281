"""The job store's guards, against a real Valkey: states, owner fencing, WATCH retries, reaper, idempotency."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from service.contracts import JobError, JobRecord, JobStatus, UpscaleParams
from service.jobsystem.keys import FINISHED_KEY, REAPER_LOCK_KEY, RUNNING_KEY
from service.jobsystem.reaper import reap_abandoned
from service.jobsystem.services import build_services
from service.jobsystem.store import IDEMPOTENCY_TTL_S, JobStore, TransitionRejected
from tests.service.helpers import STORE_RESULT_TTL_S, make_settings

RESULT_TTL_S = STORE_RESULT_TTL_S


@pytest.fixture()
def other_store(db_url):
    """A second JobStore on its own connection: the 'other process' of a race."""
    client = redis.Redis.from_url(db_url)
    yield JobStore(client, result_ttl_s=RESULT_TTL_S)
    client.close()


def new_record(tenant: str = "tenant-a") -> JobRecord:
    job_id = uuid.uuid4().hex
    return JobRecord(
        id=job_id,
        tenant=tenant,
        params=UpscaleParams(),
        input_key=f"jobs/{job_id}/input",
        input_width=24,
        input_height=16,
    )


def queued_job(store: JobStore) -> str:
    record, created = store.create(new_record())
    assert created
    return record.id


def running_job(store: JobStore, owner: str = "worker-a:1") -> str:
    job_id = queued_job(store)
    store.start(job_id, owner)
    return job_id


def interfere_once(store: JobStore, concurrent_write) -> list[str]:
    """Run ``concurrent_write()`` between the store's WATCH and its EXEC, in its first transaction only.

    Returns the store's WATCH and MULTI calls in order, so a retry shows as a second "watch".
    """
    calls: list[str] = []
    real_pipeline = store.redis.pipeline

    def pipeline(*args, **kwargs):
        pipe = real_pipeline(*args, **kwargs)
        real_watch, real_multi = pipe.watch, pipe.multi

        def watch(*names):
            calls.append("watch")
            return real_watch(*names)

        def multi():
            calls.append("multi")
            if calls.count("multi") == 1:
                concurrent_write()
            return real_multi()

        pipe.watch, pipe.multi = watch, multi
        return pipe

    store.redis.pipeline = pipeline
    return calls


def expire_lease(store: JobStore, job_id: str) -> None:
    """Let the job's lease run out for real (TTL of 1 ms), as when its worker stops renewing it."""
    store.redis.pexpire(store.lease_key(job_id), 1)
    deadline = time.monotonic() + 2
    while store.redis.exists(store.lease_key(job_id)):
        assert time.monotonic() < deadline, "the lease did not expire"
        time.sleep(0.01)


def reap(services) -> list[str]:
    """One reaper pass; its 5 s lock (which keeps concurrent reapers apart) is lifted first."""
    services.redis.delete(REAPER_LOCK_KEY)
    return reap_abandoned(services)


# ------------------------------------------------------------------ wrong states


def test_a_running_job_cannot_be_started_a_second_time(store):
    """start() only leaves `queued`: a second worker cannot take a job another attempt is running."""
    job_id = running_job(store, "worker-a:1")
    with pytest.raises(TransitionRejected):
        store.start(job_id, "worker-b:1")
    record = store.get(job_id)
    assert record.status == JobStatus.running and record.owner == "worker-a:1" and record.attempts == 1


@pytest.mark.parametrize("final", [JobStatus.succeeded, JobStatus.failed, JobStatus.canceled])
def test_a_finished_job_never_changes_state_again(store, final):
    """A final job rejects cancel, another finish, a restart and progress writes; the record stays as it was."""
    job_id = running_job(store, "worker-a:1")
    store.finish(
        job_id, final, owner="worker-a:1", output_key="jobs/x/output.png" if final == JobStatus.succeeded else None
    )
    before = store.redis.get(store.key(job_id))
    with pytest.raises(TransitionRejected):
        store.finish(job_id, JobStatus.canceled)  # the API's cancel (no owner)
    with pytest.raises(TransitionRejected):
        store.finish(job_id, JobStatus.failed, owner="worker-a:1")
    with pytest.raises(TransitionRejected):
        store.start(job_id, "worker-b:1")
    with pytest.raises(TransitionRejected):
        store.transition(job_id, [JobStatus.queued, JobStatus.running], JobStatus.queued)
    store.set_progress(job_id, 0.3, owner="worker-a:1")
    assert store.redis.get(store.key(job_id)) == before
    assert store.get(job_id).status == final


def test_a_queued_job_cannot_be_finished_by_a_worker_that_never_started_it(store):
    """finish() with an owner only leaves `running`; a queued job stays queued."""
    job_id = queued_job(store)
    with pytest.raises(TransitionRejected):
        store.finish(job_id, JobStatus.succeeded, owner="worker-a:1", output_key="jobs/x/output.png")
    record = store.get(job_id)
    assert record.status == JobStatus.queued and record.output_key is None


def test_unknown_job_and_non_final_finish_are_rejected(store):
    """A transition of a job that does not exist, and a 'finish' into a non-final state, are refused."""
    with pytest.raises(TransitionRejected, match="does not exist"):
        store.transition(uuid.uuid4().hex, [JobStatus.queued], JobStatus.running)
    job_id = running_job(store)
    with pytest.raises(ValueError, match="^queued is not a final state$"):
        store.finish(job_id, JobStatus.queued, owner="worker-a:1")
    assert store.get(job_id).status == JobStatus.running
    with pytest.raises(TransitionRejected, match=f"^job {job_id} is running$"):
        store.start(job_id, "worker-b:1")


def test_finish_releases_everything_the_job_held(store):
    """A final transition drops the lease, the running mark, the quota slot and sets the record's TTL."""
    job_id = running_job(store, "worker-a:1")
    store.request_cancel(job_id)
    assert store.active_count("tenant-a") == 1 and store.redis.sismember(RUNNING_KEY, job_id)
    store.finish(job_id, JobStatus.canceled, owner="worker-a:1")
    assert store.active_count("tenant-a") == 0
    assert not store.redis.sismember(RUNNING_KEY, job_id)
    assert not store.redis.exists(store.lease_key(job_id)) and not store.cancel_requested(job_id)
    assert 0 < store.redis.ttl(store.key(job_id)) <= RESULT_TTL_S
    assert int(store.redis.hget(FINISHED_KEY, "canceled")) == 1


# ------------------------------------------------------------------ owner fencing


def test_a_finish_by_another_owner_is_rejected(store):
    """Only the attempt that holds the job (its owner token) may finish it or report progress."""
    job_id = running_job(store, "worker-a:1")
    with pytest.raises(TransitionRejected, match="another attempt"):
        store.finish(job_id, JobStatus.succeeded, owner="worker-b:1", output_key="jobs/b/output.png")
    with pytest.raises(TransitionRejected):
        store.finish(job_id, JobStatus.failed, owner="worker-b:1", error=JobError(code="x", message="y"))
    store.set_progress(job_id, 0.7, owner="worker-b:1")
    record = store.get(job_id)
    assert record.status == JobStatus.running and record.owner == "worker-a:1"
    assert record.output_key is None and record.error is None and record.progress == 0.0
    assert store.still_owner(job_id, "worker-a:1") and not store.still_owner(job_id, "worker-b:1")
    store.set_progress(job_id, 0.7, owner="worker-a:1")
    assert store.get(job_id).progress == 0.7


def test_a_presumed_dead_worker_cannot_overwrite_the_result(tmp_path, db_url):
    """A's lease expires, the reaper re-queues, B takes over; A's late writes are fenced out before and after B
    finishes."""
    services = build_services(make_settings(tmp_path, db_url, result_ttl_s=RESULT_TTL_S))
    jobs = services.jobs
    job_id = queued_job(jobs)
    jobs.start(job_id, "worker-a:1")
    jobs.set_progress(job_id, 0.4, owner="worker-a:1")
    expire_lease(jobs, job_id)

    assert reap(services) == [job_id]
    requeued = jobs.get(job_id)
    assert requeued.status == JobStatus.queued and requeued.owner is None and requeued.progress == 0.0
    assert services.queue.position(job_id) == 0  # at the front of the queue

    jobs.start(job_id, "worker-b:1")
    assert jobs.get(job_id).attempts == 2
    # A wakes up while B runs: its progress and its finish are refused; it can tell it lost the job.
    jobs.set_progress(job_id, 0.9, owner="worker-a:1")
    with pytest.raises(TransitionRejected):
        jobs.finish(
            job_id,
            JobStatus.succeeded,
            owner="worker-a:1",
            output_key="jobs/a/output.png",
            output_width=1,
            output_height=1,
            progress=1.0,
        )
    running = jobs.get(job_id)
    assert running.status == JobStatus.running and running.owner == "worker-b:1" and running.progress == 0.0
    assert not jobs.still_owner(job_id, "worker-a:1")

    jobs.finish(
        job_id,
        JobStatus.succeeded,
        owner="worker-b:1",
        output_key="jobs/b/output.png",
        output_width=96,
        output_height=64,
        progress=1.0,
    )
    # A tries again after B finished: success or failure, nothing of A's lands.
    with pytest.raises(TransitionRejected):
        jobs.finish(job_id, JobStatus.succeeded, owner="worker-a:1", output_key="jobs/a/output.png")
    with pytest.raises(TransitionRejected):
        jobs.finish(job_id, JobStatus.failed, owner="worker-a:1", error=JobError(code="internal_error", message="late"))
    done = jobs.get(job_id)
    assert done.status == JobStatus.succeeded and done.owner == "worker-b:1"
    assert (done.output_key, done.output_width, done.output_height) == ("jobs/b/output.png", 96, 64)
    assert done.error is None and done.attempts == 2
    assert int(services.redis.hget(FINISHED_KEY, "succeeded")) == 1  # finished exactly once


# ------------------------------------------------------------------ WATCH / EXEC retries


def test_a_concurrent_write_makes_the_transition_retry_on_top_of_it(store, other_store):
    """A write between WATCH and EXEC aborts the transaction; the retry re-reads, so neither write is lost."""
    job_id = running_job(store, "worker-a:1")
    calls = interfere_once(store, lambda: other_store.set_progress(job_id, 0.5, owner="worker-a:1"))
    updated = store.transition(
        job_id, [JobStatus.running], expect_owner="worker-a:1", output_width=96, output_height=64
    )
    assert calls == ["watch", "multi", "watch", "multi"]  # aborted once by the WatchError, then committed
    stored = store.get(job_id)
    assert stored == updated
    assert stored.progress == 0.5 and (stored.output_width, stored.output_height) == (96, 64)
    assert stored.status == JobStatus.running and stored.owner == "worker-a:1"


def test_a_retried_finish_sees_the_reaper_took_the_job_away(store, other_store):
    """Worker A's finish races the reaper's re-queue; after the WatchError the retry finds the job gone and refuses."""
    job_id = running_job(store, "worker-a:1")

    def reaper_requeues() -> None:
        other_store.transition(
            job_id, [JobStatus.running], JobStatus.queued, expect_owner="worker-a:1", owner=None, progress=0.0
        )

    calls = interfere_once(store, reaper_requeues)
    with pytest.raises(TransitionRejected):
        store.finish(job_id, JobStatus.succeeded, owner="worker-a:1", output_key="jobs/a/output.png")
    assert calls == ["watch", "multi", "watch"]  # the retry re-read the record and refused
    record = store.get(job_id)
    assert record.status == JobStatus.queued and record.owner is None and record.output_key is None
    assert store.redis.hget(FINISHED_KEY, "succeeded") is None


def test_a_retried_start_sees_the_job_was_canceled(store, other_store):
    """A worker's start races the API's cancel of the queued job; the retry finds it canceled and does not run it."""
    job_id = queued_job(store)
    calls = interfere_once(store, lambda: other_store.finish(job_id, JobStatus.canceled))
    with pytest.raises(TransitionRejected):
        store.start(job_id, "worker-a:1")
    assert calls == ["watch", "multi", "watch"]  # the retry re-read the record and refused
    record = store.get(job_id)
    assert record.status == JobStatus.canceled and record.owner is None
    assert not store.redis.exists(store.lease_key(job_id)) and not store.redis.sismember(RUNNING_KEY, job_id)


# ------------------------------------------------------------------ reaper


def test_the_reaper_leaves_a_live_lease_alone(tmp_path, db_url):
    """A job whose worker still renews its lease is not re-queued."""
    services = build_services(make_settings(tmp_path, db_url))
    job_id = queued_job(services.jobs)
    services.jobs.start(job_id, "worker-a:1")
    assert reap(services) == []
    record = services.jobs.get(job_id)
    assert record.status == JobStatus.running and record.owner == "worker-a:1"


def test_the_reaper_fails_a_job_after_three_lost_attempts(tmp_path, db_url):
    """Attempts 1 and 2 that lose their worker are re-queued; the third lost attempt fails the job (worker_lost)."""
    services = build_services(make_settings(tmp_path, db_url))
    jobs = services.jobs
    job_id = queued_job(jobs)
    for attempt in (1, 2, 3):
        jobs.start(job_id, f"worker-{attempt}:1")
        assert jobs.get(job_id).attempts == attempt
        expire_lease(jobs, job_id)
        assert reap(services) == [job_id]
        record = jobs.get(job_id)
        if attempt < 3:
            assert record.status == JobStatus.queued and record.owner is None and record.error is None
            assert services.queue.position(job_id) == 0
    assert record.status == JobStatus.failed and record.error.code == "worker_lost" and record.attempts == 3
    assert not services.redis.sismember(RUNNING_KEY, job_id) and jobs.active_count("tenant-a") == 0
    assert reap(services) == []  # nothing left to reap
    with pytest.raises(TransitionRejected):
        jobs.start(job_id, "worker-4:1")


# ------------------------------------------------------------------ idempotency


def test_an_idempotency_key_returns_the_same_job_for_a_day(store):
    """The same key (same tenant) returns the first job; the key lives IDEMPOTENCY_TTL_S (24 h); other tenants
    are separate."""
    first, created = store.create(new_record(), idempotency_key="order-1")
    again, created_again = store.create(new_record(), idempotency_key="order-1")
    assert created and not created_again and again.id == first.id
    assert IDEMPOTENCY_TTL_S == 24 * 3600
    assert IDEMPOTENCY_TTL_S - 60 < store.redis.ttl("megasr:idem:tenant-a:order-1") <= IDEMPOTENCY_TTL_S
    other, created_other = store.create(new_record("tenant-b"), idempotency_key="order-1")
    assert created_other and other.id != first.id
    assert store.find_idempotent("tenant-a", "order-1").id == first.id
    assert store.find_idempotent("tenant-b", "order-1").id == other.id
    from service.jobsystem.store import IdempotencyMismatch

    with pytest.raises(IdempotencyMismatch) as mismatch:  # the same key for another request
        store.create(new_record(), idempotency_key="order-1", request_hash="another request")
    assert str(mismatch.value) == f"the Idempotency-Key was first used for a different request (job {first.id})"


def test_a_request_fingerprint_is_stable_across_releases():
    """An Idempotency-Key lives a day, across rolling upgrades, so the fingerprint's canonical form is
    fixed: sha256(sha256(image) ‖ the parameters as compact JSON, defaults filled in, keys sorted)."""
    import hashlib

    from service.jobsystem.admission import request_fingerprint

    image = b"\x89PNG not really"
    canonical = (
        '{"color_fix":"adain","guidance_scale":5.5,"negative_prompt":"dotted, noise, blur, lowres, smooth",'
        '"output_format":"png","prompt":"","scale":4.0,"seed":7,"steps":50,"webhook_url":null}'
    )
    expected = hashlib.sha256(hashlib.sha256(image).digest() + canonical.encode()).hexdigest()
    assert request_fingerprint(image, UpscaleParams(seed=7)) == expected
    # Naming a model is another request (what a key was first used for stays bound to it).
    named = request_fingerprint(image, UpscaleParams(seed=7, model="seesr-turbo"))
    assert named not in (expected, request_fingerprint(image, UpscaleParams(seed=7, model="seesr-turbo", steps=50)))
    # Fields added since (the sampler, the CFG interval) count only when a request sets them.
    assert request_fingerprint(image, UpscaleParams(seed=7, sampler="ddpm", cfg_interval=None)) == expected
    fast = {
        request_fingerprint(image, UpscaleParams(seed=7, **extra))
        for extra in ({"sampler": "unipc"}, {"cfg_interval": (0, 0.5)})
    }
    assert len(fast) == 2 and expected not in fast


def test_an_expired_idempotency_key_creates_a_new_job(store):
    """Once the key's TTL has run out, the same key makes a new job."""
    first, _ = store.create(new_record(), idempotency_key="order-2")
    store.redis.pexpire("megasr:idem:tenant-a:order-2", 1)
    deadline = time.monotonic() + 2
    while store.redis.exists("megasr:idem:tenant-a:order-2"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert store.find_idempotent("tenant-a", "order-2") is None
    second, created = store.create(new_record(), idempotency_key="order-2")
    assert created and second.id != first.id
    assert store.find_idempotent("tenant-a", "order-2").id == second.id


def test_a_key_whose_job_record_expired_is_taken_over_by_a_new_job(store):
    """If the job a live key points to has expired (records outlive keys only by accident), a new job replaces it."""
    first, _ = store.create(new_record(), idempotency_key="order-3")
    store.redis.delete(store.key(first.id))
    second, created = store.create(new_record(), idempotency_key="order-3")
    assert created and second.id != first.id
    assert store.find_idempotent("tenant-a", "order-3").id == second.id
    assert store.redis.ttl("megasr:idem:tenant-a:order-3") > IDEMPOTENCY_TTL_S - 60


def test_renewing_a_lease_rewrites_its_owner_and_full_ttl(store):
    """The running worker's heartbeat: the lease key holds its owner token again for LEASE_TTL_S."""
    from service.jobsystem.store import LEASE_TTL_S

    job_id = queued_job(store)
    store.start(job_id, "worker-a:1")
    store.redis.expire(store.lease_key(job_id), 2)  # nearly expired
    store.renew_lease(job_id, "worker-a:1")
    assert store.redis.get(store.lease_key(job_id)) == b"worker-a:1"
    assert LEASE_TTL_S - 2 <= store.redis.ttl(store.lease_key(job_id)) <= LEASE_TTL_S


def test_the_worker_heartbeat_keeps_renewing_the_leases_of_its_running_jobs(tmp_path, db_url):
    """WorkerRuntime's background loop renews the lease of every job it runs, so a job that runs longer
    than LEASE_TTL_S is not taken for abandoned; a job it no longer runs is left to expire."""
    from service.jobsystem.store import LEASE_TTL_S
    from worker.runtime import WorkerRuntime

    services = build_services(make_settings(tmp_path, db_url))
    jobs = services.jobs
    mine, gone = running_job(jobs, "worker-a:1"), running_job(jobs, "worker-a:2")
    runtime = WorkerRuntime(services=services, pipeline=None)
    runtime.running[mine] = "worker-a:1"
    for job_id in (mine, gone):
        jobs.redis.pexpire(jobs.lease_key(job_id), 600)  # nearly run out
    runtime.start_background(lease_interval_s=0.05, reap_interval_s=3600)
    try:
        time.sleep(1.0)
    finally:
        runtime.stop()
    assert jobs.redis.get(jobs.lease_key(mine)) == b"worker-a:1"
    assert LEASE_TTL_S - 2 <= jobs.redis.ttl(jobs.lease_key(mine)) <= LEASE_TTL_S
    assert not jobs.redis.exists(jobs.lease_key(gone))
    assert reap(services) == [gone]


def test_records_due_for_deletion_come_oldest_first_up_to_the_limit(store):
    from service.jobsystem.keys import EXPIRY_KEY

    now = time.time()
    store.redis.zadd(EXPIRY_KEY, {"old": now - 30, "older": now - 60, "future": now + 600})
    assert store.due_for_deletion() == ["older", "old"]
    assert store.due_for_deletion(limit=1) == ["older"]


def test_a_key_written_before_requests_were_fingerprinted_reads_as_an_empty_hash(store):
    """Keys of the version before idempotency was bound to the request hold only the job id: they read as the
    empty hash, so a store-level caller (no hash) gets the job and an API request (a hash) is told it differs."""
    first, _ = store.create(new_record())
    key = store.idempotency_key("tenant-a", "old-order")
    store.redis.hset(key, mapping={"job": first.id})
    assert store.find_idempotent_request("tenant-a", "old-order") == (first, "")
    again, created = store.create(new_record(), idempotency_key="old-order")
    assert not created and again.id == first.id


def test_forgetting_a_job_drops_its_expiry_entry_and_its_list_of_outputs(store):
    """After its images are deleted, nothing of the job is left to the deleter: no expiry entry, no outputs set."""
    from service.jobsystem.keys import EXPIRY_KEY

    job_id = running_job(store)
    store.note_output(job_id, f"jobs/{job_id}/output-1.png")
    store.finish(job_id, JobStatus.succeeded, owner="worker-a:1")
    assert store.redis.zscore(EXPIRY_KEY, job_id) is not None and store.redis.exists(store.outputs_key(job_id))
    store.forget(job_id)
    assert store.redis.zscore(EXPIRY_KEY, job_id) is None and not store.redis.exists(store.outputs_key(job_id))


def test_start_takes_a_lease_that_expires_and_runs_the_callers_writes_in_its_transaction(store):
    """The lease expires on its own after LEASE_TTL_S (so a dead worker's job is reaped); ``extra`` (the
    batch claim's removal from RQ's queue) gets the transaction and the started record, and its write
    lands only with the start."""
    from service.jobsystem.store import LEASE_TTL_S

    job_id = queued_job(store)
    seen = []

    def claim(pipe, record) -> None:
        seen.append((record.status, record.owner, record.attempts))
        pipe.set(f"test:claimed:{job_id}", record.owner)

    store.start(job_id, "worker-a:1", extra=claim)
    assert LEASE_TTL_S - 2 <= store.redis.ttl(store.lease_key(job_id)) <= LEASE_TTL_S
    assert seen == [(JobStatus.running, "worker-a:1", 1)]
    assert store.redis.get(f"test:claimed:{job_id}") == b"worker-a:1"
    with pytest.raises(TransitionRejected):  # not queued any more: nothing of the caller's is written
        store.start(job_id, "worker-b:1", extra=lambda pipe, record: pipe.set(f"test:claimed:{job_id}", "b"))
    assert store.redis.get(f"test:claimed:{job_id}") == b"worker-a:1"


def test_requeue_is_fenced_to_the_owner_and_drops_the_lease(store):
    """A transient failure puts the job back: only the attempt that holds it may, and its lease goes with it."""
    job_id = running_job(store, "worker-a:1")
    with pytest.raises(TransitionRejected):
        store.requeue(job_id, "worker-b:1", None)
    assert store.get(job_id).status == JobStatus.running and store.redis.exists(store.lease_key(job_id))
    requeued = store.requeue(job_id, "worker-a:1", None)
    assert requeued.status == JobStatus.queued and requeued.owner is None and requeued.progress == 0.0
    assert not store.redis.exists(store.lease_key(job_id)) and not store.redis.sismember(RUNNING_KEY, job_id)


def test_a_cancel_request_is_a_flag_that_lives_a_day(store):
    """The flag a running batch polls; it expires on its own if the job's final transition never clears it."""
    job_id = running_job(store)
    assert not store.cancel_requested(job_id)
    store.request_cancel(job_id)
    assert store.cancel_requested(job_id)
    assert 24 * 3600 - 2 <= store.redis.ttl(store.cancel_key(job_id)) <= 24 * 3600


def test_progress_is_clamped_to_0_1_and_rounded_to_four_places(store):
    job_id = running_job(store)
    for reported, stored in ((1.7, 1.0), (-0.3, 0.0), (0.123456, 0.1235)):
        store.set_progress(job_id, reported, owner="worker-a:1")
        assert store.get(job_id).progress == stored


def test_a_noted_output_is_remembered_until_the_record_and_its_idempotency_key_are_gone(store):
    """The outputs set outlives the record by the idempotency TTL, so the deleter still finds every attempt's file."""
    job_id = running_job(store)
    store.note_output(job_id, f"jobs/{job_id}/output-a.png")
    assert store.outputs(job_id) == [f"jobs/{job_id}/output-a.png"]
    ttl = store.redis.ttl(store.outputs_key(job_id))
    assert RESULT_TTL_S + IDEMPOTENCY_TTL_S - 2 <= ttl <= RESULT_TTL_S + IDEMPOTENCY_TTL_S
