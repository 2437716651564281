"""GET /v1/jobs: a tenant's jobs newest first, paginated by an opaque cursor, filtered by status."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from service.jobsystem.store import JobStore
from tests.service.helpers import KEY_A, KEY_B, make_settings, submit

A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


@pytest.fixture()
def settings(tmp_path, db_url):
    return make_settings(tmp_path, db_url, api_keys=f"a:{KEY_A},b:{KEY_B}", allow_anonymous=False)


def submitted(client, count: int, headers=A) -> list[str]:
    ids = []
    for _ in range(count):
        response = submit(client, headers=headers, steps=1)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def test_newest_first_in_pages_until_next_is_null(client):
    ids = submitted(client, 5)
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params, headers=A)
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["jobs"]) <= 2
        seen += [job["id"] for job in body["jobs"]]
        pages += 1
        cursor = body["next"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert pages == 3
    job = client.get("/v1/jobs", params={"limit": 1}, headers=A).json()["jobs"][0]
    assert job == client.get(f"/v1/jobs/{ids[-1]}", headers=A).json()  # the same view as GET /v1/jobs/{id}


def test_only_the_callers_jobs(client):
    mine = submitted(client, 2, A)
    theirs = submitted(client, 1, B)
    assert [j["id"] for j in client.get("/v1/jobs", headers=A).json()["jobs"]] == mine[::-1]
    assert [j["id"] for j in client.get("/v1/jobs", headers=B).json()["jobs"]] == theirs
    assert client.get("/v1/jobs").status_code == 401


def test_status_filter(client):
    first, second, third = submitted(client, 3)
    assert client.delete(f"/v1/jobs/{second}", headers=A).json()["status"] == "canceled"
    canceled = client.get("/v1/jobs", params={"status": "canceled"}, headers=A).json()
    assert [j["id"] for j in canceled["jobs"]] == [second] and canceled["next"] is None
    queued = client.get("/v1/jobs", params={"status": "queued", "limit": 1}, headers=A).json()
    assert [j["id"] for j in queued["jobs"]] == [third]
    rest = client.get("/v1/jobs", params={"status": "queued", "cursor": queued["next"]}, headers=A).json()
    assert [j["id"] for j in rest["jobs"]] == [first]
    both = client.get("/v1/jobs", params=[("status", "queued"), ("status", "canceled")], headers=A).json()
    assert [j["id"] for j in both["jobs"]] == [third, second, first]
    wrong = client.get("/v1/jobs", params={"status": "lost"}, headers=A)
    assert wrong.status_code == 422 and wrong.json()["error"]["code"] == "invalid_parameters"


def test_expired_records_are_skipped_and_dropped_from_the_index(client):
    first, second, third = submitted(client, 3)
    services = client.app.state.services
    services.redis.delete(JobStore.key(second))  # as the result TTL does
    listed = client.get("/v1/jobs", headers=A).json()
    assert [j["id"] for j in listed["jobs"]] == [third, first]
    index = [m.decode() for m in services.redis.zrange(JobStore.index_key("a"), 0, -1)]
    assert index == [first, third]


def test_cursor_and_limit_are_checked(client):
    submitted(client, 1)
    import base64

    not_finite = [
        base64.urlsafe_b64encode(f'[{n},"x"]'.encode()).decode().rstrip("=")
        for n in ("NaN", "Infinity", "-Infinity", "1e999", "-1E400")
    ]
    for cursor in ("nonsense", "W10", "WyJ4IiwxXQ", *not_finite):  # not base64 JSON, [], ["x", 1], no number
        response = client.get("/v1/jobs", params={"cursor": cursor}, headers=A)
        assert response.status_code == 422, cursor
        assert response.json()["error"]["code"] == "invalid_cursor"
    for limit in (0, 101):
        assert client.get("/v1/jobs", params={"limit": limit}, headers=A).status_code == 422


def test_index_is_written_in_the_create_transaction(store):
    from service.contracts import JobRecord, UpscaleParams

    record = JobRecord(id="j1", tenant="t", params=UpscaleParams(), input_key="k", input_width=8, input_height=8)
    store.create(record)
    assert store.redis.zscore(JobStore.index_key("t"), "j1") == pytest.approx(record.created_at.timestamp())
    records, more = store.list_for_tenant("t", 10)
    assert [r.id for r in records] == ["j1"] and more is None


def test_the_index_forgets_jobs_no_record_can_outlive_and_expires_when_silent(store):
    """Tenants that never list their jobs must not grow their index for ever."""
    from datetime import timedelta

    from service.contracts import JobRecord, UpscaleParams
    from service.jobsystem.store import INDEX_SLACK_S

    def record(job_id: str, age_s: float) -> JobRecord:
        created = datetime.now(UTC) - timedelta(seconds=age_s)
        return JobRecord(
            id=job_id,
            tenant="t",
            params=UpscaleParams(),
            input_key="k",
            input_width=8,
            input_height=8,
            created_at=created,
        )

    horizon = store.result_ttl_s + INDEX_SLACK_S
    store.create(record("ancient", horizon + 60))
    store.create(record("recent", 60))
    index = JobStore.index_key("t")
    assert store.redis.zscore(index, "ancient") is None and store.redis.zscore(index, "recent") is not None
    assert 0 < store.redis.ttl(index) <= horizon


def tenant_record(job_id: str, created: datetime):
    from service.contracts import JobRecord, UpscaleParams

    return JobRecord(
        id=job_id, tenant="t", params=UpscaleParams(), input_key="k", input_width=8, input_height=8, created_at=created
    )


def every_page(store: JobStore, limit: int, statuses=()) -> list[str]:
    seen, position = [], None
    for _ in range(100):
        records, position = store.list_for_tenant("t", limit, position, statuses)
        seen += [record.id for record in records]
        if position is None:
            return seen
    raise AssertionError("the pages never ended")


def test_more_jobs_of_one_microsecond_than_a_read_holds_are_all_listed_once(store):
    """120 jobs with the same creation time (one index score): pages of 10 walk all of them, each once, in
    descending id order, although after 50 the first read after the cursor holds only jobs already seen."""
    created = datetime.now(UTC)
    ids = [f"job-{n:03d}" for n in range(120)]
    for job_id in ids:
        store.create(tenant_record(job_id, created))
    assert every_page(store, 10) == sorted(ids, reverse=True)


def test_a_filter_whose_matches_lie_past_the_first_read_finds_them(store):
    """60 jobs, the 5 oldest canceled: the first read (50 newest) holds no match, the listing reads on."""
    from datetime import timedelta

    from service.contracts import JobStatus

    start = datetime.now(UTC) - timedelta(hours=1)
    ids = [f"job-{n:03d}" for n in range(60)]
    for n, job_id in enumerate(ids):
        store.create(tenant_record(job_id, start + timedelta(seconds=n)))
    for job_id in ids[:5]:
        store.finish(job_id, JobStatus.canceled)
    assert every_page(store, 10, [JobStatus.canceled]) == ids[:5][::-1]
    assert every_page(store, 7) == ids[::-1]
