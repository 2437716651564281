"""Dynamic batching in the worker: real Valkey, real storage, the real task and the tiny pipeline."""

from __future__ import annotations

import io
import signal

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from rq.worker import SimpleWorker
from skimage import data

from service.app import create_app
from service.contracts import input_key
from tests.harness.processes import start_worker, wait_ready
from tests.service.helpers import make_settings, submit, wait_for
from worker.main import make_worker
from worker.runtime import install_runtime

STEPS = 2


def photo_png(name: str, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(getattr(data, name)()).resize(size, Image.Resampling.BICUBIC).save(buffer, format="PNG")
    return buffer.getvalue()


# LR sizes whose padded working size is the same (128×192) in the tiny pipeline: one bucket.
PHOTOS = [("chelsea", (40, 28)), ("coffee", (41, 28)), ("rocket", (44, 30)), ("astronaut", (40, 29))]


class ModelBatches:
    """The image count of every pipeline call the worker makes (CFG doubles the model batch)."""

    def __init__(self, pipeline) -> None:
        self.calls: list[int] = []
        self.handle = pipeline.denoiser.register_forward_pre_hook(self._record)

    def _record(self, _module, args) -> None:
        self.calls.append(args[0].shape[0] // 2)

    def close(self) -> None:
        self.handle.remove()


def run_burst(settings, pipeline) -> object:
    runtime = install_runtime(settings, pipeline)
    connection = runtime.services.redis
    make_worker(SimpleWorker, connection, settings.queue_name).work(burst=True)  # JSON jobs, fair dequeue
    return runtime


@pytest.fixture()
def batching(tmp_path, redis_url, tiny_pipeline):
    settings = make_settings(tmp_path, redis_url, max_batch=4, batch_wait_ms=0)
    recorder = ModelBatches(tiny_pipeline)
    with TestClient(create_app(settings)) as client:
        yield settings, client, tiny_pipeline, recorder
    recorder.close()


def as_array(client, job: dict) -> np.ndarray:
    body = client.get(job["result_url"]).content
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=np.float64)


def test_four_compatible_jobs_run_as_one_batch_and_match_solo_runs(batching):
    settings, client, pipeline, recorder = batching
    ids = [
        submit(client, image=photo_png(name, size), steps=STEPS, seed=10 + i, prompt=f"photo {i}").json()["id"]
        for i, (name, size) in enumerate(PHOTOS)
    ]
    runtime = run_burst(settings, pipeline)
    assert recorder.calls == [4] * STEPS
    for i, job_id in enumerate(ids):
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded" and job["progress"] == 1.0
        name, size = PHOTOS[i]
        solo = pipeline(photo_png(name, size), num_inference_steps=STEPS, seed=10 + i, prompt=f"photo {i}").images[0]
        assert np.abs(as_array(client, job) - np.asarray(solo, dtype=np.float64)).mean() <= 1.0
    histogram = runtime.metrics.batch_size.collect()[0].samples
    assert {s.name: s.value for s in histogram}["megasr_worker_batch_size_sum"] == 4
    waits = {s.name: s.value for s in runtime.metrics.queue_wait.collect()[0].samples}
    assert waits["megasr_worker_queue_wait_seconds_count"] == 4


def test_an_incompatible_job_runs_alone_and_first_when_it_heads_the_queue(batching):
    settings, client, pipeline, recorder = batching
    odd = submit(client, image=photo_png("chelsea", (40, 28)), steps=STEPS + 1, seed=1).json()["id"]
    mates = [submit(client, image=photo_png(name, size), steps=STEPS, seed=2).json()["id"] for name, size in PHOTOS[1:]]
    run_burst(settings, pipeline)
    assert recorder.calls == [1] * (STEPS + 1) + [3] * STEPS
    jobs = {job_id: client.get(f"/v1/jobs/{job_id}").json() for job_id in [odd, *mates]}
    assert all(job["status"] == "succeeded" for job in jobs.values())
    assert max(jobs[odd]["started_at"], jobs[odd]["finished_at"]) <= min(jobs[m]["started_at"] for m in mates)


def test_cancelling_one_job_of_a_batch_lets_the_others_finish(batching):
    """The cancel of the middle job arrives while the batch of three runs (from the second model call on):
    that job stops at a later step, the batch goes on with two, and the other two finish."""
    settings, client, pipeline, recorder = batching
    from worker.tasks import upscale

    steps = 8
    ids = [submit(client, image=photo_png(name, size), steps=steps, seed=3).json()["id"] for name, size in PHOTOS[:3]]
    answers = []

    def cancel_during_the_second_call(_module, _args) -> None:
        if len(recorder.calls) == 2 and not answers:
            answers.append(client.delete(f"/v1/jobs/{ids[1]}").json())

    handle = pipeline.denoiser.register_forward_pre_hook(cancel_during_the_second_call)
    install_runtime(settings, pipeline)
    try:
        upscale(ids[0])  # as RQ would hand out the head job
    finally:
        handle.remove()
    assert answers[0]["cancel_requested"] is True and answers[0]["status"] == "running"
    statuses = [client.get(f"/v1/jobs/{job_id}").json()["status"] for job_id in ids]
    assert statuses == ["succeeded", "canceled", "succeeded"]
    assert recorder.calls[:2] == [3, 3] and recorder.calls[-1] == 2 and len(recorder.calls) == steps
    assert recorder.calls == sorted(recorder.calls, reverse=True)  # once out of the batch, it stays out


def test_a_bad_image_fails_only_its_own_job(batching):
    settings, client, pipeline, recorder = batching
    ids = [submit(client, image=photo_png(name, size), steps=STEPS, seed=4).json()["id"] for name, size in PHOTOS[:3]]
    storage = client.app.state.services.storage
    storage.put(input_key(ids[1]), b"\x89PNG\r\n\x1a\n but then nothing a decoder can read", "image/png")
    run_burst(settings, pipeline)
    jobs = [client.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
    assert [j["status"] for j in jobs] == ["succeeded", "failed", "succeeded"]
    assert jobs[1]["error"]["code"] == "invalid_input"
    assert recorder.calls == [2] * STEPS


class OutOfMemoryAbove:
    """The real pipeline, but a batch of more than ``limit`` images raises CUDA's OOM error first."""

    def __init__(self, pipeline, limit: int) -> None:
        self.pipeline, self.limit, self.sizes = pipeline, limit, []

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def __call__(self, images, **kwargs):
        self.sizes.append(len(images))
        if len(images) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self.pipeline(images, **kwargs)


def test_out_of_memory_splits_the_batch_in_half(batching):
    settings, client, pipeline, recorder = batching
    ids = [submit(client, image=photo_png(name, size), steps=STEPS, seed=5).json()["id"] for name, size in PHOTOS]
    injected = OutOfMemoryAbove(pipeline, limit=2)
    run_burst(settings, injected)
    assert injected.sizes == [4, 2, 2]
    assert recorder.calls == [2] * STEPS * 2
    assert all(client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded" for job_id in ids)


def test_sigkill_mid_batch_every_job_finishes_once(tmp_path, db_url, tiny_weights, monkeypatch):
    # A database of its own (db_url): the workers' sweeper repairs every job record it finds in it.
    settings = make_settings(tmp_path, db_url)
    monkeypatch.setenv("MEGASR_MAX_BATCH", "3")
    with TestClient(create_app(settings)) as client:
        # 30 steps: ~3 s for the batch, so the kill lands mid-batch
        ids = [submit(client, image=photo_png(name, size), steps=30, seed=6).json()["id"] for name, size in PHOTOS[:3]]
        first, port = start_worker(settings, tiny_weights, tmp_path / "worker1.log")
        second = None
        try:
            wait_ready(first, port)
            for job_id in ids:
                wait_for(client, job_id, lambda j: j["status"] == "running" and j["progress"] > 0, timeout=180)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            second, _ = start_worker(settings, tiny_weights, tmp_path / "worker2.log")
            done = [
                wait_for(client, job_id, lambda j: j["status"] in ("succeeded", "failed", "canceled"), timeout=300)
                for job_id in ids
            ]
            assert [job["status"] for job in done] == ["succeeded"] * 3, done
            jobs = client.app.state.services.jobs
            assert [jobs.get(job_id).attempts for job_id in ids] == [2, 2, 2]  # killed batch + the one that finished
            assert client.app.state.services.queue.depth() == 0
            log = (tmp_path / "worker2.log").read_text()
            assert "batched with" in log
        finally:
            for process in (first, second):
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait(timeout=10)


class OutOfMemoryUntilTiled:
    """The real pipeline, but untiled runs raise CUDA's OOM error (as a large image would)."""

    def __init__(self, pipeline) -> None:
        self.pipeline, self.calls = pipeline, []

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def __call__(self, images, **kwargs):
        self.calls.append((len(images), kwargs["tile_size"], kwargs["tile_batch_size"]))
        if kwargs["tile_size"] is None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB (injected)")
        return self.pipeline(images, **kwargs)


def test_out_of_memory_on_one_job_retries_with_fewer_then_smaller_tiles(batching):
    settings, client, pipeline, recorder = batching
    ids = [submit(client, image=photo_png(name, size), steps=STEPS, seed=7).json()["id"] for name, size in PHOTOS[:2]]
    injected = OutOfMemoryUntilTiled(pipeline)
    run_burst(settings, injected)
    # The pair is split first, then the first job alone goes from all its tiles in one model batch
    # to 4 tiles per batch → 1 → 64-latent tiles. The second starts at the tile batching the worker
    # has learnt (1 tile per batch); the tile size is not remembered: it changes the output.
    assert injected.calls == [
        (2, None, 16),
        (1, None, 16),
        (1, None, 4),
        (1, None, 1),
        (1, 64, 1),
        (1, None, 1),
        (1, 64, 1),
    ]
    assert all(client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded" for job_id in ids)


class FlakyStorage:
    """The real storage, but reading the named keys fails once each (storage unreachable)."""

    def __init__(self, storage, keys: set[str]) -> None:
        self.storage, self.failing = storage, set(keys)

    def __getattr__(self, name):
        return getattr(self.storage, name)

    def get(self, key: str) -> bytes:
        from service.storage import StorageUnavailable

        if key in self.failing:
            self.failing.discard(key)
            raise StorageUnavailable(f"injected: {key} unreachable")
        return self.storage.get(key)


def test_a_claimed_job_with_a_transient_error_is_queued_again_and_finishes(batching):
    settings, client, pipeline, recorder = batching
    ids = [submit(client, image=photo_png(name, size), steps=STEPS, seed=8).json()["id"] for name, size in PHOTOS[:3]]
    runtime = install_runtime(settings, pipeline)
    runtime.services.storage = FlakyStorage(runtime.services.storage, {input_key(ids[1])})
    runtime.storage_patience_s = 0  # an outage longer than the worker waits out
    connection = runtime.services.redis
    make_worker(SimpleWorker, connection, settings.queue_name).work(burst=True)  # JSON jobs, fair dequeue
    jobs = client.app.state.services.jobs
    assert [client.get(f"/v1/jobs/{job_id}").json()["status"] for job_id in ids] == ["succeeded"] * 3
    assert [jobs.get(job_id).attempts for job_id in ids] == [1, 2, 1]
    assert recorder.calls == [2] * STEPS + [1] * STEPS  # the pair, then the re-queued job alone


def test_a_short_storage_outage_is_waited_out_inside_the_attempt(batching):
    """The worker retries the store in place (default patience 45 s): no job is re-queued."""
    settings, client, pipeline, recorder = batching
    ids = [submit(client, image=photo_png(name, size), steps=STEPS, seed=8).json()["id"] for name, size in PHOTOS[:3]]
    runtime = install_runtime(settings, pipeline)
    runtime.services.storage = FlakyStorage(runtime.services.storage, {input_key(ids[1])})
    connection = runtime.services.redis
    make_worker(SimpleWorker, connection, settings.queue_name).work(burst=True)
    jobs = client.app.state.services.jobs
    assert [client.get(f"/v1/jobs/{job_id}").json()["status"] for job_id in ids] == ["succeeded"] * 3
    assert [jobs.get(job_id).attempts for job_id in ids] == [1, 1, 1]
    assert recorder.calls == [3] * STEPS  # one batch of all three


class FailingPipeline:
    """The real pipeline's attributes, but every call raises the given error."""

    def __init__(self, pipeline, error: BaseException) -> None:
        self.pipeline, self.error, self.batches = pipeline, error, []

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def __call__(self, images, **kwargs):
        self.batches.append(len(images))
        raise self.error


@pytest.mark.parametrize(
    "error, code",
    [
        (type("JobTimeoutException", (Exception,), {})("job exceeded its timeout"), "timeout"),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), "fatal"),
    ],
)
def test_timeout_and_fatal_errors_fail_every_job_without_retry(batching, error, code):
    from worker.tasks import upscale

    settings, client, pipeline, recorder = batching
    ids = [submit(client, image=photo_png(name, size), steps=STEPS, seed=9).json()["id"] for name, size in PHOTOS[:2]]
    failing = FailingPipeline(pipeline, error)
    install_runtime(settings, failing)
    if code == "fatal":
        with pytest.raises(RuntimeError, match="CUDA error"):  # the process exits for a fresh CUDA context
            upscale(ids[0])
    else:
        upscale(ids[0])
    jobs = [client.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
    assert [j["status"] for j in jobs] == ["failed", "failed"]
    assert {j["error"]["code"] for j in jobs} == {code}
    assert failing.batches == [2]  # neither is re-run job by job: the time is up / the context is broken
