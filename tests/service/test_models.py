"""Several models per deployment, and honest model identity: routing by ``model`` to one queue per
model, ``unknown_model``, ``GET /v1/models`` and ``/readyz`` from what workers announce, and every
RQ path (cancel, reaper, sweeper, metrics) on the job's own model's queue. Real Valkey and storage;
the pipeline is a stand-in with a real ``ModelIdentity`` (the end-to-end run of two real tiny
models is ``test_model_routing.py``)."""

from __future__ import annotations

import base64
import json
import time
import urllib.request

import pytest
from fastapi.testclient import TestClient
from rq.worker import SimpleWorker

from megasr_core.identity import TINY_REASON, ModelIdentity
from service import models_registry
from service.app import create_app
from service.contracts import JobRecord, ModelInfo, UpscaleParams
from service.jobsystem.reaper import reap_abandoned
from service.jobsystem.sweeper import sweep
from tests.harness.ports import free_port
from tests.service.helpers import KEY_A, StandIn, make_settings, png, submit
from worker.batching import batch_key, sampling
from worker.main import make_worker
from worker.runtime import install_runtime
from worker.status_server import WorkerMetrics

MODELS = "seesr,seesr-turbo"


class TurboStandIn(StandIn):
    """A stand-in that says it is tiny SeeSR-Turbo weights, and records what it was asked to run."""

    identity = ModelIdentity("seesr-turbo", "tiny-turbo", "float32", (TINY_REASON,), "ram")

    def __init__(self, **kwargs) -> None:
        super().__init__("green", **kwargs)
        self.calls: list[dict] = []

    def __call__(self, images, scale=4, **kwargs):
        self.calls.append(kwargs)
        return super().__call__(images, scale=scale, **kwargs)


@pytest.fixture()
def settings(tmp_path, db_url):
    return make_settings(tmp_path, db_url, models=MODELS)


def info(name: str = "seesr-turbo", identity: ModelIdentity = TurboStandIn.identity) -> ModelInfo:
    return ModelInfo(name=name, **identity.to_dict())


# ------------------------------------------------------------------ routing and unknown models


def test_an_omitted_model_goes_to_the_default_and_a_named_one_to_its_own_queue(client, settings):
    services = client.app.state.services
    default = submit(client, seed=1).json()
    named = submit(client, model="seesr-turbo", seed=1).json()
    assert (default["model"], default["params"]["model"]) == ("seesr", "seesr")  # resolved and recorded
    assert (named["model"], named["params"]["model"]) == ("seesr-turbo", "seesr-turbo")
    assert default["model_info"] is None and default["params"]["steps"] is None  # the model's default, later
    assert services.jobs.get(named["id"]).model == "seesr-turbo"
    seesr, turbo = services.queue_for("seesr"), services.queue_for("seesr-turbo")
    assert (seesr.name, turbo.name) == (f"{settings.queue_name}-seesr", f"{settings.queue_name}-seesr-turbo")
    assert seesr.depth() == turbo.depth() == 1
    assert default["queue_position"] == named["queue_position"] == 0  # each first in its own queue
    again = submit(client, model="seesr-turbo").json()
    assert client.get(f"/v1/jobs/{again['id']}").json()["queue_position"] == 1
    assert services.redis.llen(f"rq:queue:{settings.queue_name}") == 0  # nothing on the unnamed queue


def test_a_json_body_names_the_model_too(client):
    body = {"image": "data:image/png;base64," + base64.b64encode(png()).decode(), "model": "seesr-turbo"}
    response = client.post("/v1/upscale", json=body)
    assert response.status_code == 202 and response.json()["model"] == "seesr-turbo"


@pytest.mark.parametrize("how", ["multipart", "json"])
def test_an_unknown_model_is_a_422_that_lists_the_served_ones_and_stores_nothing(client, settings, how):
    services = client.app.state.services
    if how == "multipart":
        response = submit(client, model="megasr-xl")
    else:
        response = client.post(
            "/v1/upscale",
            json={"image": "data:image/png;base64," + base64.b64encode(png()).decode(), "model": "megasr-xl"},
        )
    assert response.status_code == 422
    assert response.json() == {
        "error": {
            "code": "unknown_model",
            "message": "model 'megasr-xl' is not served here; served models: seesr, seesr-turbo",
        }
    }
    assert services.jobs.active_count("default") == 0
    assert not list((settings.home / "data").glob("**/input"))  # no input was written to storage
    assert services.queue_for("megasr-xl").depth() == 0


def test_a_malformed_model_name_is_an_invalid_parameter(client):
    response = submit(client, model="Not A Name")
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_parameters"
    assert response.json()["error"]["message"].startswith("model:")


def test_a_single_model_deployment_keeps_its_queue(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url)
    with TestClient(create_app(settings)) as client:
        job = submit(client).json()
        assert job["model"] == "default" and client.app.state.services.queue.name == settings.queue_name
        assert client.app.state.services.redis.llen(f"rq:queue:{settings.queue_name}") == 1
        assert submit(client, model="seesr").json()["error"]["message"].endswith("served models: default")


def test_idempotency_keys_replay_and_bind_the_model(client):
    headers = {"Idempotency-Key": "order-7"}
    first = submit(client, model="seesr-turbo", seed=3, headers=headers)
    again = submit(client, model="seesr-turbo", seed=3, headers=headers)
    assert first.status_code == again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"] and again.json()["model"] == "seesr-turbo"
    other = submit(client, model="seesr", seed=3, headers=headers)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_mismatch"
    assert client.app.state.services.queue_for("seesr-turbo").depth() == 1


def test_canceling_a_queued_job_takes_it_off_its_models_queue(client):
    services = client.app.state.services
    job_id = submit(client, model="seesr-turbo").json()["id"]
    assert services.queue_for("seesr-turbo").depth() == 1
    response = client.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    assert services.queue_for("seesr-turbo").depth() == 0 and not services.queue_for("seesr-turbo").claimed_by_rq(
        job_id
    )


def test_queue_depth_is_reported_per_models_queue(client, settings):
    from prometheus_client.parser import text_string_to_metric_families

    submit(client, model="seesr-turbo")
    submit(client, model="seesr-turbo")
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    depth = {s.labels["queue"]: s.value for s in families["megasr_queue_depth"].samples}
    assert depth == {f"{settings.queue_name}-seesr": 0, f"{settings.queue_name}-seesr-turbo": 2}


# ------------------------------------------------------------------ housekeeping on the job's own queue


def test_the_reaper_requeues_a_dead_workers_job_on_its_models_queue(client):
    services = client.app.state.services
    turbo = services.queue_for("seesr-turbo")
    job_id = submit(client, model="seesr-turbo").json()["id"]
    services.jobs.start(job_id, "gone:1", extra=lambda pipe, _: turbo.discard(job_id, pipe, None))  # as a claim does
    services.redis.delete(services.jobs.lease_key(job_id))  # its worker died
    assert job_id in reap_abandoned(services)
    assert services.jobs.get(job_id).status.value == "queued"
    assert turbo.position(job_id) == 0 and services.queue_for("seesr").depth() == 0


def test_the_sweeper_reenqueues_a_lost_job_on_its_models_queue(client):
    services = client.app.state.services
    turbo = services.queue_for("seesr-turbo")
    lost = submit(client, model="seesr-turbo").json()["id"]
    held = submit(client, model="seesr").json()["id"]
    services.redis.lrem(turbo.queue.key, 0, lost)  # RQ lost it
    report = sweep(services)
    assert report.enqueued == [lost]  # the seesr job is held by its own queue: left alone
    assert turbo.position(lost) == 0 and services.queue_for("seesr").position(held) == 0
    assert services.queue_for("seesr").depth() == 1


# ------------------------------------------------------------------ the worker: its queue, defaults, model_info


def test_a_worker_takes_only_its_models_jobs_fills_in_its_defaults_and_records_itself(client, settings):
    services = client.app.state.services
    mine = submit(client, model="seesr-turbo", seed=5).json()["id"]
    explicit = submit(client, model="seesr-turbo", seed=5, steps=7, guidance_scale=3).json()["id"]
    theirs = submit(client, seed=5).json()["id"]  # the default model, seesr: not this worker's
    bad = submit(client, model="seesr-turbo").json()["id"]
    services.storage.put(services.jobs.get(bad).input_key, b"not an image", "image/png")
    pipeline = TurboStandIn()
    runtime = install_runtime(settings.model_copy(update={"model": "seesr-turbo"}), pipeline)
    assert runtime.queue.name == f"{settings.queue_name}-seesr-turbo"
    make_worker(SimpleWorker, runtime.services.redis, runtime.queue.name).work(burst=True)
    # Left out: the model's own 2 steps at CFG 1; named: as named.
    assert [(c["num_inference_steps"], c["guidance_scale"]) for c in pipeline.calls] == [(2, 1.0), (7, 3.0)]
    done, failed = client.get(f"/v1/jobs/{mine}").json(), client.get(f"/v1/jobs/{bad}").json()
    assert done["status"] == "succeeded" and done["model"] == "seesr-turbo"
    assert done["model_info"] == {**TurboStandIn.identity.to_dict(), "name": "seesr-turbo"}
    assert done["model_info"]["trained"] is False and done["model_info"]["untrained_reason"] == TINY_REASON
    assert failed["status"] == "failed" and failed["model_info"]["family"] == "seesr-turbo"  # failures say it too
    assert client.get(f"/v1/jobs/{explicit}").json()["model_info"]["default_steps"] == 2
    waiting = client.get(f"/v1/jobs/{theirs}").json()
    assert waiting["status"] == "queued" and waiting["queue_position"] == 0 and waiting["model_info"] is None


def test_left_out_steps_batch_with_the_models_explicit_default():
    def record(**params) -> JobRecord:
        return JobRecord(
            id="j", tenant="t", params=UpscaleParams(**params), input_key="k", input_width=32, input_height=32
        )

    def geometry(size, scale):  # one bucket for all
        return size, size, (512, 512)

    defaults = (2, 1.0)
    assert sampling(UpscaleParams(), defaults) == (2, 1.0) and sampling(UpscaleParams(), None) == (None, None)
    assert sampling(UpscaleParams(steps=4, guidance_scale=0), defaults) == (4, 0.0)
    assert batch_key(record(), geometry, defaults) == batch_key(record(steps=2, guidance_scale=1), geometry, defaults)
    assert batch_key(record(), geometry, defaults) != batch_key(record(steps=3), geometry, defaults)
    # a fast sampler's own steps are its default; a sampler or CFG interval of its own never batches with DDPM
    assert sampling(UpscaleParams(sampler="dpmpp-2m"), (50, 5.5)) == (25, 5.5)
    assert sampling(UpscaleParams(sampler="unipc", steps=7), (50, 5.5)) == (7, 5.5)
    fast = record(sampler="dpmpp-2m", steps=2)
    assert batch_key(fast, geometry, defaults) != batch_key(record(), geometry, defaults)
    assert batch_key(fast, geometry, defaults) == batch_key(record(sampler="dpmpp-2m", steps=2), geometry, defaults)
    banded = record(cfg_interval=(0, 0.5))
    assert batch_key(banded, geometry, defaults) != batch_key(record(), geometry, defaults)


# ------------------------------------------------------------------ announcements, /v1/models, /readyz


def test_announcements_count_live_workers_expire_and_are_withdrawn(db_url):
    import redis

    client = redis.Redis.from_url(db_url)
    assert models_registry.read(client, ["seesr-turbo"]) == [models_registry.Announced("seesr-turbo", None, 0)]
    models_registry.announce(client, info(), "worker-a", ttl_s=1)
    models_registry.announce(client, info(), "worker-b", ttl_s=30)
    models_registry.announce(client, info(), "worker-b", ttl_s=30)  # a renewal is no second worker
    [found] = models_registry.read(client, ["seesr-turbo"])
    assert found.workers == 2 and found.info == info()
    time.sleep(1.2)
    assert models_registry.read(client, ["seesr-turbo"])[0].workers == 1  # worker-a stopped renewing
    models_registry.withdraw(client, "seesr-turbo", "worker-b")
    [found] = models_registry.read(client, ["seesr-turbo"])
    assert found.workers == 0 and found.info == info()  # what it was stays known
    assert 0 < client.ttl(models_registry.info_key("seesr-turbo")) <= models_registry.INFO_TTL_S
    assert models_registry.read(client, []) == []
    client.close()


def test_v1_models_before_and_after_a_worker_announces(client, settings):
    listed = client.get("/v1/models")
    assert listed.status_code == 200
    empty = dict.fromkeys(
        (
            "family",
            "title",
            "weights",
            "dtype",
            "precision",
            "tagger",
            "trained",
            "untrained_reason",
            "default_steps",
            "default_guidance_scale",
            "sampler_steps",
        )
    )
    assert listed.json() == {
        "models": [
            {"name": "seesr", "default": True, "workers": 0, **empty},
            {"name": "seesr-turbo", "default": False, "workers": 0, **empty},
        ]
    }
    runtime = install_runtime(settings.model_copy(update={"model": "seesr-turbo"}), TurboStandIn())
    runtime.metrics.mark_ready()  # as prepare() does once warmed up; the loop announces from then on
    runtime.start_background(lease_interval_s=0.1)
    try:
        deadline = time.monotonic() + 10
        while (models := client.get("/v1/models").json()["models"])[1]["workers"] != 1:
            assert time.monotonic() < deadline, models
            time.sleep(0.05)
        assert models[0]["workers"] == 0 and models[0]["family"] is None
        assert models[1] == {
            "name": "seesr-turbo",
            "default": False,
            "workers": 1,
            "family": "seesr-turbo",
            "title": "SeeSR-Turbo",
            "weights": "tiny-turbo",
            "dtype": "float32",
            "precision": "full",
            "tagger": "ram",
            "trained": False,
            "untrained_reason": TINY_REASON,
            "default_steps": 2,
            "default_guidance_scale": 1.0,
            # a job naming no steps: Turbo's own 2 with DDPM, the solvers' own defaults otherwise
            "sampler_steps": {"ddpm": 2, "dpmpp-2m": 25, "unipc": 20},
        }
        ready = client.get("/readyz").json()
        assert ready["models"] == [
            {"name": "seesr", "family": None, "trained": None, "workers": 0},
            {"name": "seesr-turbo", "family": "seesr-turbo", "trained": False, "workers": 1},
        ]
    finally:
        runtime.stop()
    assert client.get("/v1/models").json()["models"][1]["workers"] == 0  # a stopping worker withdraws
    assert client.get("/v1/models").json()["models"][1]["family"] == "seesr-turbo"


def test_a_worker_not_ready_is_not_announced(client, settings):
    runtime = install_runtime(settings.model_copy(update={"model": "seesr"}), TurboStandIn())
    runtime.start_background(lease_interval_s=0.05)
    try:
        time.sleep(0.3)
        assert client.get("/v1/models").json()["models"][0]["workers"] == 0
    finally:
        runtime.stop()


def test_v1_models_needs_an_api_key_and_is_in_the_openapi_document(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url, api_keys=f"a:{KEY_A}", allow_anonymous=False)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/models").status_code == 401
        models = client.get("/v1/models", headers={"Authorization": f"Bearer {KEY_A}"}).json()["models"]
        assert [(m["name"], m["default"]) for m in models] == [("default", True)]
        doc = client.get("/openapi.json").json()
        operation = doc["paths"]["/v1/models"]["get"]
        assert operation["operationId"] == "listModels" and operation["security"] == [{"apiKey": []}]
        assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ModelList"
        }
        form = doc["paths"]["/v1/upscale"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert form["properties"]["model"]["pattern"] == "^[a-z0-9][a-z0-9._-]{0,62}$"
        job = doc["components"]["schemas"]["JobView"]["properties"]
        assert "model" in job and "model_info" in job


def test_the_readiness_body_lists_models_without_changing_the_answer(client):
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert [m["name"] for m in ready.json()["models"]] == ["seesr", "seesr-turbo"]


def test_the_workers_own_readyz_names_its_model():
    metrics = WorkerMetrics()
    metrics.model = {"name": "seesr-turbo"}
    port = free_port()
    server = metrics.serve("127.0.0.1", port)
    try:
        with pytest.raises(urllib.error.HTTPError) as loading:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert json.loads(loading.value.read()) == {"status": "loading", "model": {"name": "seesr-turbo"}}
        metrics.model = info().model_dump(mode="json")
        metrics.mark_ready()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            body = json.loads(response.read())
        assert (
            body["status"] == "ready" and body["model"]["family"] == "seesr-turbo" and body["model"]["trained"] is False
        )
    finally:
        server.shutdown()
        server.server_close()


def test_the_client_lists_models_and_names_one(client, settings):
    from megasr_client.client import MegaSRClient

    api = MegaSRClient(http=client)
    assert [m.name for m in api.models()] == ["seesr", "seesr-turbo"]
    job = api.submit(png(), model="seesr-turbo", seed=2)
    assert job.model == "seesr-turbo" and job.params.steps is None
