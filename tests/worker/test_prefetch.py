"""The input prefetcher: the next waiting jobs' inputs, fetched and decoded while the GPU runs, and
taken by the worker instead of a storage read; nothing claimed, failures dropped quietly."""

from __future__ import annotations

import numpy as np
import pytest

from service.jobsystem.services import build_services
from service.logging_setup import log_fields
from service.routes.jobs import _admit
from tests.service.helpers import StandIn, make_settings, png
from worker import tasks
from worker.input_image import load_input
from worker.prefetch import InputPrefetcher
from worker.runtime import install_runtime


@pytest.fixture()
def services(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url, max_batch=2)
    with log_fields():
        yield settings, build_services(settings)


def admit(svc, seed: int) -> str:
    record, _ = _admit(svc, "default", png(), "image/png", {"steps": "2", "seed": str(seed)}, None)
    return record.id


def same_image(a, b) -> bool:
    return np.array_equal(np.asarray(a.rgb), np.asarray(b.rgb)) and a.size == b.size


def test_the_next_jobs_inputs_are_decoded_ahead_and_taken_once(services):
    settings, svc = services
    first, second, third = (admit(svc, seed) for seed in (1, 2, 3))
    runtime = install_runtime(settings, StandIn(), services=svc)
    prefetcher = InputPrefetcher(svc, runtime.queue, capacity=4)
    try:
        prefetcher.prefetch_next(1, skip={first})
        prefetcher.wait()
        record = svc.jobs.get(second)
        taken = prefetcher.take(second, record.input_key)
        assert taken is not None and same_image(taken, load_input(svc.storage.get(record.input_key), settings))
        assert prefetcher.take(second, record.input_key) is None  # once
        assert prefetcher.take(third, svc.jobs.get(third).input_key) is None  # not asked for (count 1)
        assert prefetcher.take(first, svc.jobs.get(first).input_key) is None  # skipped: the batch's own
        assert svc.jobs.get(second).status.value == "queued" and svc.queue.position(second) is not None  # unclaimed
    finally:
        prefetcher.close()


def test_an_unreadable_input_is_not_cached_and_the_cache_is_bounded(services):
    settings, svc = services
    ids = [admit(svc, seed) for seed in (1, 2, 3, 4)]
    broken = svc.jobs.get(ids[0])
    svc.storage.put(broken.input_key, b"not an image", "image/png")
    prefetcher = InputPrefetcher(svc, install_runtime(settings, StandIn(), services=svc).queue, capacity=2)
    try:
        prefetcher.prefetch_next(4)
        prefetcher.wait()
        assert prefetcher.take(ids[0], broken.input_key) is None and prefetcher.misses >= 1
        kept = [job_id for job_id in ids[1:] if prefetcher.take(job_id, svc.jobs.get(job_id).input_key) is not None]
        assert kept == ids[2:]  # the oldest entry made room
    finally:
        prefetcher.close()


def test_a_worker_batch_prefetches_the_next_and_the_next_batch_takes_it(services):
    """While a batch runs, the job waiting next is decoded; when its turn comes it is not read again."""
    settings, svc = services
    ids = [admit(svc, seed) for seed in (1, 2, 3)]
    runtime = install_runtime(settings, StandIn(), services=svc)
    assert runtime.max_batch == 2
    reads: list[str] = []
    real_get = svc.storage.get

    def counting(key: str) -> bytes:
        reads.append(key)
        return real_get(key)

    svc.storage.get = counting
    try:
        tasks.BatchRun(runtime, [tasks.Member(svc.jobs.start(ids[0], "w:1"), "w:1", primary=False)]).run()
        runtime.prefetcher().wait()
        reads.clear()
        for job_id in ids[1:]:
            tasks.BatchRun(runtime, [tasks.Member(svc.jobs.start(job_id, "w:2"), "w:2", primary=False)]).run()
        assert runtime.prefetcher().hits >= 1
        assert svc.jobs.get(ids[1]).input_key not in reads  # the next job's input came from the prefetch
        assert [svc.jobs.get(job_id).status.value for job_id in ids] == ["succeeded"] * 3
    finally:
        runtime.stop()
