"""Schemathesis over the app's own OpenAPI document: no request, valid or not, gets a 5xx.

Every operation of ``/openapi.json`` is called in-process (ASGI) with generated requests,
positive and negative, against a real Valkey database and local storage, with an API key so
that authentication passes and the handlers behind it are reached. The only check is
``not_a_server_error``: a 5xx answer (or an exception escaping the app) is a bug.
Examples are bounded per operation and Hypothesis's deadline is off (two slow shared cores),
so the whole run stays well under a minute.
"""

from __future__ import annotations

import base64
import os
import traceback

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup

from service.app import create_app
from tests.service.helpers import make_settings, png, submit

FUZZ_KEY = "fuzz-key-0123456789"
AUTH = {"Authorization": f"Bearer {FUZZ_KEY}"}
#: generated requests per operation and mode (positive: valid by the document, negative: not)
MAX_EXAMPLES = int(os.environ.get("MEGASR_FUZZ_EXAMPLES", "40"))
#: the same requests on every run unless MEGASR_FUZZ_RANDOM=1 (CI stays reproducible; a local
#: run can explore further)
DERANDOMIZE = os.environ.get("MEGASR_FUZZ_RANDOM", "") != "1"
IMAGE = png(16, 16)
IMAGE_DATA_URL = "data:image/png;base64," + base64.b64encode(IMAGE).decode()


@pytest.fixture()
def fuzz_app(tmp_path, db_url):
    """The app with one tenant key, a fresh Valkey database, local storage and one real job in it."""
    settings = make_settings(
        tmp_path,
        db_url,
        api_keys=f"fuzz:{FUZZ_KEY}",
        max_queued_per_tenant=10_000,
        rate_limit_per_minute=100_000,
        rate_limit_burst=100_000,
    )
    app = create_app(settings)
    with TestClient(app) as client:  # a real job, for the job routes to find
        response = submit(client, image=IMAGE, headers=AUTH, steps=1)
    assert response.status_code == 202, response.text
    app.state.fuzz_job_id = response.json()["id"]
    return app


def with_real_image(case):
    """The generated upscale request with a real image in its ``image`` field (as a file, or as a
    data URL in JSON): random bytes never decode, so without this the parameters behind the image
    check are never reached."""
    if isinstance(case.body, dict):
        case.body["image"] = IMAGE_DATA_URL if case.media_type == "application/json" else IMAGE
    return case


def fuzz_operation(operation, mode: GenerationMode, prepare=None, **fixed) -> str | None:
    """Run generated requests of one mode against one operation (``fixed``: parts not generated,
    e.g. ``path_parameters``; ``prepare``: a change to each case); the first 5xx found, described, or None."""
    strategy = operation.as_strategy(generation_mode=mode, **fixed)

    @given(case=strategy.map(prepare) if prepare else strategy)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=DERANDOMIZE,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.shrink],
    )
    def run(case) -> None:
        case.call_and_validate(headers=AUTH, checks=[not_a_server_error])

    try:
        run()
    except Unsatisfiable:  # nothing in the operation can be made invalid (e.g. a free-form path string)
        assert not mode.is_positive, f"{operation.label}: no valid request can be generated"
    except FailureGroup as failures:  # a 5xx answer: schemathesis's report holds the request (curl)
        return f"{operation.label} ({mode.value}):\n{failures}"
    except Exception:  # an exception escaped the app (the ASGI transport re-raises it)
        return f"{operation.label} ({mode.value}): the app raised\n{traceback.format_exc()}"
    return None


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda mode: mode.value)
def test_no_request_gets_a_server_error(fuzz_app, mode):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6, [op.label for op in operations]
    found = [problem for operation in operations if (problem := fuzz_operation(operation, mode))]
    # The job routes once more, on a job that exists (random ids only ever reach the 404 path).
    job = {"path_parameters": {"job_id": fuzz_app.state.fuzz_job_id}}
    found += [
        problem
        for operation in operations
        if "{job_id}" in operation.path and (problem := fuzz_operation(operation, mode, **job))
    ]
    # Submissions once more with a real image, so that generated parameters get past the image check.
    found += [
        problem
        for operation in operations
        if operation.method.upper() == "POST" and (problem := fuzz_operation(operation, mode, prepare=with_real_image))
    ]
    assert not found, "server errors:\n\n" + "\n\n".join(found)


def test_the_document_lists_every_route(fuzz_app):
    """The fuzzing above covers what the document lists: make sure that is every public route."""
    paths = TestClient(fuzz_app).get("/openapi.json").json()["paths"]
    operations = {(method.upper(), path) for path, item in paths.items() for method in item}
    assert operations >= {
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("POST", "/v1/upscale"),
        ("GET", "/v1/jobs/{job_id}"),
        ("GET", "/v1/jobs/{job_id}/result"),
        ("DELETE", "/v1/jobs/{job_id}"),
    }
