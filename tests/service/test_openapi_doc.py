"""The OpenAPI document: bearer auth (Swagger's Authorize), typed form fields, error schemas,
readable operation ids; and the recorded seed of every job."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.contracts import UpscaleParams
from tests.service.helpers import KEY_A, make_settings, run_worker, submit


@pytest.fixture()
def settings(tmp_path, db_url):
    return make_settings(tmp_path, db_url, api_keys=f"a:{KEY_A}", allow_anonymous=False)


def test_operation_ids_are_stable_names(client):
    paths = client.get("/openapi.json").json()["paths"]
    ids = {(method, path): op["operationId"] for path, ops in paths.items() for method, op in ops.items()}
    assert len(set(ids.values())) == len(ids)
    assert {key: ids.get(key) for key in EXPECTED_IDS} == EXPECTED_IDS


EXPECTED_IDS = {
    ("post", "/v1/upscale"): "createUpscaleJob",
    ("get", "/v1/jobs"): "listJobs",
    ("get", "/v1/jobs/{job_id}"): "getJob",
    ("delete", "/v1/jobs/{job_id}"): "cancelJob",
    ("get", "/v1/jobs/{job_id}/result"): "getJobResult",
    ("get", "/v1/jobs/{job_id}/events"): "streamJobEvents",
    ("get", "/healthz"): "getLiveness",
    ("get", "/readyz"): "getReadiness",
}


def test_bearer_scheme_on_every_job_operation(client):
    doc = client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key of MEGASR_API_KEYS: `Authorization: Bearer KEY`",
    }
    for path, ops in doc["paths"].items():
        if path.startswith("/v1/"):
            for op in ops.values():
                assert op["security"] == [{"apiKey": []}], path


def test_upload_fields_are_typed_with_their_bounds(client):
    body = client.get("/openapi.json").json()["paths"]["/v1/upscale"]["post"]["requestBody"]["content"]
    form = body["multipart/form-data"]["schema"]["properties"]
    assert form["image"] == {"type": "string", "format": "binary"}
    assert (form["scale"]["type"], form["scale"]["minimum"], form["scale"]["maximum"]) == ("number", 1, 8)
    assert (form["steps"]["type"], form["steps"]["minimum"], form["steps"]["maximum"]) == ("integer", 1, 200)
    # seeds a JavaScript number holds exactly (2**53 − 1), so a browser can reproduce a job
    assert form["seed"]["type"] == "integer" and form["seed"]["maximum"] == 2**53 - 1
    assert form["color_fix"]["enum"] == ["adain", "wavelet", "none"]
    assert form["output_format"]["enum"] == ["png", "jpeg", "webp"]
    assert set(form) == {"image", *UpscaleParams.model_fields}
    assert body["application/json"]["schema"]["properties"]["steps"] == form["steps"]


def test_errors_reference_the_error_model(client):
    doc = client.get("/openapi.json").json()
    error = doc["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["error"]
    assert set(doc["components"]["schemas"][error["properties"]["error"]["$ref"].split("/")[-1]]["properties"]) == {
        "code",
        "message",
    }
    for path, method, statuses in (
        ("/v1/upscale", "post", ("401", "413", "422", "429")),
        ("/v1/jobs/{job_id}", "get", ("401", "404")),
        ("/v1/jobs/{job_id}", "delete", ("404", "409")),
        ("/v1/jobs", "get", ("401", "422")),
    ):
        responses = doc["paths"][path][method]["responses"]
        for status in statuses:
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (path, status)


def test_auth_answers_are_unchanged(client):
    for headers, message in (
        ({}, "missing API key"),
        ({"Authorization": "Basic abc"}, "uses the Basic scheme; this API takes only 'Authorization: Bearer KEY'"),
        ({"Authorization": f"Token {KEY_A}"}, "uses the Token scheme; this API takes only 'Authorization: Bearer KEY'"),
        ({"Authorization": "Bearer "}, "missing API key"),
        ({"Authorization": "Bearer wrong-key-123"}, "invalid API key"),
        ({"Authorization": KEY_A}, "is not 'Bearer KEY'"),  # a bare key: refused, never echoed
    ):
        response = client.get("/v1/jobs/x", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "unauthorized" and message in response.json()["error"]["message"]
        assert KEY_A not in response.text
    ok = client.get("/v1/jobs", headers={"Authorization": f"bearer {KEY_A}"})
    assert ok.status_code == 200


def test_a_seed_is_drawn_recorded_and_kept_by_retries(tmp_path, db_url, tiny_pipeline):
    settings = make_settings(tmp_path, db_url)
    with TestClient(create_app(settings)) as client:
        first = submit(client, steps=1, headers={"Idempotency-Key": "k1"}).json()
        seed = first["params"]["seed"]
        assert isinstance(seed, int) and 0 <= seed <= 2**53 - 1  # drawn within what JavaScript holds
        retry = submit(client, steps=1, headers={"Idempotency-Key": "k1"})
        assert retry.headers["idempotent-replayed"] == "true" and retry.json()["params"]["seed"] == seed
        again = submit(client, steps=1).json()
        assert again["params"]["seed"] != seed  # a fresh draw for another submission
        chosen = submit(client, steps=1, seed=seed).json()  # the same seed by hand: the same image
        assert chosen["params"]["seed"] == seed
        run_worker(settings, tiny_pipeline)
        results = [client.get(f"/v1/jobs/{j['id']}/result").content for j in (first, again, chosen)]
        assert results[0] == results[2] and results[0] != results[1]
