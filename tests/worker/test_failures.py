"""How the worker fails: fatal errors stop it, tenants read fixed messages, late attempts cannot
overwrite a result. Real Valkey, real storage, RQ's real worker loop; the pipeline is a stand-in
that returns or raises what each test needs."""

from __future__ import annotations

import io
import logging
import time
from types import SimpleNamespace

import pytest
from PIL import Image
from rq.worker import SimpleWorker

from megasr_core.output_formats import encode
from service import tracing
from service.contracts import JobStatus, attempt_output_key
from service.jobsystem.keys import REAPER_LOCK_KEY
from service.jobsystem.reaper import delete_expired_results, reap_abandoned
from service.jobsystem.services import build_services
from service.jobsystem.store import TransitionRejected
from service.logging_setup import configure_logging, log_fields
from service.routes.jobs import _admit
from tests.service.helpers import StandIn, admit, form_fields, json_lines, make_settings, png
from worker import tasks
from worker.batching import CancelWatch
from worker.main import EXIT_FATAL, MegaSRWorker, make_worker, run_worker
from worker.runtime import install_runtime

CUDA_CRASH = "CUDA error: an illegal memory access was encountered"


@pytest.fixture()
def services(tmp_path, db_url, monkeypatch):
    monkeypatch.setattr(tasks, "RETRY_BACKOFF_S", 0.0)
    settings = make_settings(tmp_path, db_url)
    # BatchRun.run() called here directly, outside the task's fresh log context, binds its job's fields
    # into the test's own context: log_fields restores that context afterwards, so later tests' log
    # lines do not carry them.
    with log_fields():
        yield settings, build_services(settings)


def test_a_fatal_cuda_error_fails_the_job_and_stops_the_worker(services, caplog):
    settings, svc = services
    first, second = admit(svc), admit(svc)
    runtime = install_runtime(settings, StandIn(error=RuntimeError(CUDA_CRASH)), services=svc)
    with caplog.at_level(logging.ERROR, logger="megasr.worker"), pytest.raises(SystemExit) as exited:
        run_worker(runtime, settings, burst=True)
    assert exited.value.code == EXIT_FATAL  # the orchestrator restarts the process
    failed = svc.jobs.get(first)
    assert failed.status == JobStatus.failed and failed.error.code == "fatal" and failed.attempts == 1
    assert (
        failed.error.message == "the worker's GPU failed while running the job; the worker restarts"
    )  # the tenant's view
    assert CUDA_CRASH in caplog.text  # the operator's view
    assert svc.jobs.get(second).status == JobStatus.queued  # not taken by the broken worker
    assert svc.queue.depth() == 1 and svc.queue.position(second) == 0  # and the first is not retried


def test_the_worker_class_stops_itself_after_a_fatal_error(services):
    """In-process, without run_worker's exit: the work loop ends after the fatal job."""
    settings, svc = services
    ids = [admit(svc) for _ in range(3)]
    install_runtime(settings, StandIn(error=RuntimeError(CUDA_CRASH)), services=svc)
    worker = make_worker(MegaSRWorker, svc.redis, settings.queue_name)
    worker.work(burst=True)
    assert str(worker.fatal_error) == f"fatal error in job {ids[0]}: RuntimeError: {CUDA_CRASH}"
    assert isinstance(worker.fatal_error.__cause__, RuntimeError) and str(worker.fatal_error.__cause__) == CUDA_CRASH
    assert [svc.jobs.get(i).status for i in ids] == [JobStatus.failed, JobStatus.queued, JobStatus.queued]


def test_tenants_read_a_fixed_message_and_the_worker_log_the_exception(services, caplog):
    settings, svc = services
    job_id = admit(svc)
    secret = RuntimeError("cannot open /srv/megasr/weights/unet.safetensors on gpu-node-17")
    install_runtime(settings, StandIn(error=secret), services=svc)
    with caplog.at_level(logging.WARNING, logger="megasr.worker"):
        make_worker(SimpleWorker, svc.redis, settings.queue_name).work(burst=True)
    record = svc.jobs.get(job_id)
    assert record.status == JobStatus.failed and record.attempts == 3
    assert record.error.code == "internal_error"
    assert record.error.message == "the job failed inside the worker; it was retried 2 times"
    assert "gpu-node-17" in caplog.text


def test_a_value_error_from_a_library_is_not_shown_but_our_invalid_image_message_is(services):
    settings, svc = services
    library, ours = admit(svc), admit(svc)
    svc.storage.put(svc.jobs.get(ours).input_key, b"GIF89a and then nothing", "image/gif")
    install_runtime(settings, StandIn(error=ValueError("operands could not be broadcast (3,512,768)")), services=svc)
    make_worker(SimpleWorker, svc.redis, settings.queue_name).work(burst=True)
    error = svc.jobs.get(library).error
    assert error.code == "invalid_input" and error.message == "the image or its parameters cannot be processed"
    own = svc.jobs.get(ours).error  # megasr_core's InvalidImageError: written for users
    assert own.code == "invalid_input" and own.message != error.message and "broadcast" not in own.message


def test_a_late_attempt_cannot_overwrite_a_finished_output(services):
    """A is presumed dead and its job finished by B; A wakes up and writes its result: B's stays."""
    settings, svc = services
    job_id = admit(svc)
    runtime = install_runtime(settings, StandIn("red"), services=svc)
    a = svc.jobs.start(job_id, "worker-a:1")
    svc.redis.delete(svc.jobs.lease_key(job_id))  # A stops renewing its lease
    svc.redis.delete(REAPER_LOCK_KEY)
    assert reap_abandoned(svc) == [job_id]
    # B takes the re-queued job through RQ and finishes it (blue).
    runtime.pipeline = StandIn("blue")
    make_worker(SimpleWorker, svc.redis, settings.queue_name).work(burst=True)
    done = svc.jobs.get(job_id)
    assert done.status == JobStatus.succeeded
    result = svc.storage.get(done.output_key)
    # A wakes up with its own (red) result and runs its write-and-finish path.
    runtime.pipeline = StandIn("red")
    tasks.BatchRun(runtime, [tasks.Member(a, "worker-a:1", primary=False)]).run()
    after = svc.jobs.get(job_id)
    assert after.output_key == done.output_key and svc.storage.get(done.output_key) == result
    assert Image.open(io.BytesIO(result)).getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(TransitionRejected):
        svc.jobs.finish(job_id, JobStatus.succeeded, owner="worker-a:1")
    # A's stray file is known, so the result deletion removes it with B's.
    outputs = svc.jobs.outputs(job_id)
    assert len(outputs) == 2 and done.output_key in outputs
    svc.redis.zadd("megasr:expiry", {job_id: 0})
    assert delete_expired_results(svc) == 1
    assert not any(svc.storage.exists(key) for key in outputs) and not svc.storage.exists(done.input_key)


def finished_count(runtime, status: str) -> float:
    """This worker's ``megasr_worker_jobs_total`` for one outcome."""
    return runtime.metrics.registry.get_sample_value("megasr_worker_jobs_total", {"status": status}) or 0.0


def attempt(svc, job_id: str, owner: str) -> tasks.Member:
    """The job started by ``owner`` and handed to a batch as a claimed mate (no RQ retry of its own)."""
    return tasks.Member(svc.jobs.start(job_id, owner), owner, primary=False)


def test_an_invalid_image_reads_its_own_message_and_counts_as_failed(services):
    """megasr_core's InvalidImageError text reaches the tenant word for word; both failures are counted."""
    from megasr_core.pipelines import InvalidImageError, load_image

    settings, svc = services
    admit(svc)  # another job of the same batch: it fails on the pipeline's error, and counts too
    ours = admit(svc)
    broken = b"GIF89a and then nothing"
    svc.storage.put(svc.jobs.get(ours).input_key, broken, "image/gif")
    runtime = install_runtime(settings, StandIn(error=ValueError("operands could not be broadcast")), services=svc)
    make_worker(SimpleWorker, svc.redis, settings.queue_name).work(burst=True)
    with pytest.raises(InvalidImageError) as expected:
        load_image(broken)
    assert svc.jobs.get(ours).error.message == str(expected.value)
    assert finished_count(runtime, "failed") == 2


def test_a_cancel_raised_by_the_pipeline_cancels_the_job(services):
    from megasr_core.pipelines import PipelineCancelled

    settings, svc = services
    job_id = admit(svc)
    runtime = install_runtime(settings, StandIn(error=PipelineCancelled("canceled")), services=svc)
    tasks.BatchRun(runtime, [attempt(svc, job_id, "worker-a:1")]).run()
    record = svc.jobs.get(job_id)
    assert record.status == JobStatus.canceled and record.error is None
    assert finished_count(runtime, "canceled") == 1


def pipeline_cancelled() -> BaseException:
    from megasr_core.pipelines import PipelineCancelled

    return PipelineCancelled("stopped")


@pytest.mark.parametrize(
    "error",
    [ValueError("bad parameters"), RuntimeError(CUDA_CRASH), RuntimeError("flaky"), pipeline_cancelled()],
    ids=["invalid_input", "fatal", "retry", "canceled"],
)
def test_a_late_attempt_that_fails_leaves_the_new_owners_job_alone(services, error):
    """A is presumed dead and B runs the job; A's failure or stop (whatever its kind) cannot fail, cancel or
    re-queue B's job."""
    settings, svc = services
    job_id = admit(svc)
    runtime = install_runtime(settings, StandIn(error=error), services=svc)
    late = attempt(svc, job_id, "worker-a:1")
    svc.jobs.requeue(job_id, "worker-a:1", None)  # what the reaper does once A's lease ran out
    svc.jobs.start(job_id, "worker-b:1")
    run = tasks.BatchRun(runtime, [late])
    if CUDA_CRASH in str(error):
        with pytest.raises(tasks.FatalWorkerError):
            run.run()
    else:
        run.run()
    record = svc.jobs.get(job_id)
    assert record.status == JobStatus.running and record.owner == "worker-b:1" and record.error is None
    assert finished_count(runtime, "failed") == 0 and finished_count(runtime, "canceled") == 0


@pytest.mark.parametrize(("attempts", "status"), [(2, JobStatus.queued), (3, JobStatus.failed)])
def test_a_claimed_job_is_retried_until_its_third_attempt_fails(services, attempts, status):
    """A batch mate's retries are ours (not RQ's): after a failed second attempt it goes back to the queue;
    a failed third attempt fails it, saying it was retried twice."""
    settings, svc = services
    job_id = admit(svc)
    runtime = install_runtime(settings, StandIn(error=RuntimeError("flaky")), services=svc)
    for n in range(1, attempts):
        svc.jobs.start(job_id, f"worker-{n}:1")
        svc.jobs.requeue(job_id, f"worker-{n}:1", None)
    member = attempt(svc, job_id, f"worker-{attempts}:1")
    assert member.record.attempts == attempts
    tasks.BatchRun(runtime, [member]).run()
    record = svc.jobs.get(job_id)
    assert record.status == status
    if status == JobStatus.failed:
        assert record.error.code == "internal_error"
        assert record.error.message == "the job failed inside the worker; it was retried 2 times"
    else:
        assert record.error is None and svc.queue.position(job_id) == 0
    assert finished_count(runtime, "failed") == (status == JobStatus.failed)


def test_the_job_rq_handed_out_is_queued_again_once_after_a_transient_error(services):
    """The head job's retry is RQ's own (its Retry re-pushes it): our requeue only resets the record, so the
    job waits in RQ's queue once, not twice."""
    settings, svc = services
    job_id = admit(svc)
    install_runtime(settings, StandIn(error=RuntimeError("flaky")), services=svc)
    make_worker(SimpleWorker, svc.redis, settings.queue_name).work(burst=True, max_jobs=1)
    record = svc.jobs.get(job_id)
    assert record.status == JobStatus.queued and record.attempts == 1 and record.owner is None
    assert svc.queue.depth() == 1 and svc.queue.position(job_id) == 0


@pytest.mark.parametrize(("fmt", "options"), [("png", {}), ("jpeg", {"quality": 95}), ("webp", {"quality": 95})])
def test_results_are_encoded_as_documented(fmt, options):
    """PNG; JPEG and WebP at quality 95 (docs/api.md, output_format): the bytes Pillow writes with those settings."""
    import numpy as np

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    expected = io.BytesIO()
    image.save(expected, format=fmt.upper(), **options)
    assert encode(image, fmt) == expected.getvalue()


class SteppingStandIn(StandIn):
    """The stand-in pipeline, reporting ``steps`` denoising steps to the worker's progress callback at once;
    ``before_step`` (step → None) runs before the callback of each step."""

    def __init__(self, steps: int, before_step=None) -> None:
        super().__init__("blue")
        self.steps, self.before_step = steps, before_step

    def __call__(self, images, scale=4, callback=None, **kwargs):
        for step in range(1, self.steps + 1):
            if self.before_step is not None:
                self.before_step(step)
            callback(step, self.steps)
        return super().__call__(images, scale=scale, **kwargs)


def record_progress(svc, monkeypatch) -> list[float]:
    """The progress values the worker writes (or tries to), in order."""
    written: list[float] = []
    real = svc.jobs.set_progress
    monkeypatch.setattr(
        svc.jobs, "set_progress", lambda *args, **kwargs: (written.append(args[1]), real(*args, **kwargs))
    )
    return written


def watch_every(monkeypatch, interval_s: float) -> None:
    """The worker's cancel watch re-reads Redis at most every ``interval_s`` (the first check always reads)."""
    monkeypatch.setattr(
        tasks, "CancelWatch", lambda services, owners: CancelWatch(services, owners, interval_s=interval_s)
    )


def test_no_progress_is_written_for_a_job_once_its_cancel_is_seen(services, monkeypatch):
    """The cancel arrives before step 3: steps 1 and 2 are written, none after."""
    monkeypatch.setattr(tasks, "PROGRESS_INTERVAL_S", 0.0)
    watch_every(monkeypatch, 0.0)
    settings, svc = services
    job_id = admit(svc)
    cancel_before_3 = lambda step: svc.jobs.request_cancel(job_id) if step == 3 else None  # noqa: E731
    runtime = install_runtime(settings, SteppingStandIn(10, cancel_before_3), services=svc)
    written = record_progress(svc, monkeypatch)
    tasks.BatchRun(runtime, [attempt(svc, job_id, "worker-a:1")]).run()
    assert written == [0.1, 0.2]


def test_a_late_attempts_progress_leaves_the_new_owners_job_alone(services, monkeypatch):
    """A is presumed dead and B takes the job before A's step 5, within one interval of A's cancel watch
    (so A has not seen it yet): A's progress writes are fenced out and B's progress stays."""
    monkeypatch.setattr(tasks, "PROGRESS_INTERVAL_S", 0.0)
    watch_every(monkeypatch, 3600.0)
    settings, svc = services
    job_id = admit(svc)

    def hand_over_before_5(step: int) -> None:
        if step == 5:
            svc.jobs.requeue(job_id, "worker-a:1", None)  # what the reaper does once A's lease ran out
            svc.jobs.start(job_id, "worker-b:1")
            svc.jobs.set_progress(job_id, 0.05, owner="worker-b:1")

    runtime = install_runtime(settings, SteppingStandIn(10, hand_over_before_5), services=svc)
    tasks.BatchRun(runtime, [attempt(svc, job_id, "worker-a:1")]).run()
    record = svc.jobs.get(job_id)
    assert record.status == JobStatus.running and record.owner == "worker-b:1"
    assert record.progress == 0.05


def test_progress_is_written_at_most_once_per_interval_and_always_at_the_last_step(services, monkeypatch):
    """Ten steps well within one interval: the first and the last are written, the eight between are not."""
    monkeypatch.setattr(tasks, "PROGRESS_INTERVAL_S", 30.0)  # no stall of a loaded machine spans it
    settings, svc = services
    job_id = admit(svc)
    runtime = install_runtime(settings, SteppingStandIn(10), services=svc)
    written = record_progress(svc, monkeypatch)
    tasks.BatchRun(runtime, [attempt(svc, job_id, "worker-a:1")]).run()
    assert written == [0.1, 1.0]
    assert svc.jobs.get(job_id).status == JobStatus.succeeded


# ------------------------------------------------------------------ how a batch meets the pipeline's errors
# The stand-in pipeline below records every call, so each of these runs in well under a second; the
# real-pipeline versions of the same paths are in test_batching.py.

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


class Scripted(StandIn):
    """Records each call's arguments; ``fail(call) -> exception | None`` decides whether a call raises."""

    def __init__(self, fail=None, drop=(), timings=None) -> None:
        super().__init__("blue")
        self.fail, self.drop, self.calls, self.timings = fail, set(drop), [], dict(timings or {})
        self.extractors = SimpleNamespace(tagger_name="ram")

    def __call__(self, images, scale=4, **kwargs):
        call = {"images": len(images), "scale": scale, **kwargs}
        self.calls.append(call)
        error = self.fail(call) if self.fail else None
        if error is not None:
            raise error
        out = super().__call__(images, scale=scale)
        out.images = [None if seed in self.drop else image for seed, image in zip(kwargs["seed"], out.images)]
        out.timings = self.timings
        return out


def admit_with(svc, **fields) -> str:
    values = {"steps": "2", **form_fields(fields)}
    record, _ = _admit(svc, "default", png(), "image/png", values, None)
    return record.id


def run_batch(settings, svc, pipeline, job_ids: list[str]) -> tasks.BatchRun:
    runtime = install_runtime(settings, pipeline, services=svc)
    run = tasks.BatchRun(runtime, [attempt(svc, job_id, f"worker-a:{i}") for i, job_id in enumerate(job_ids)])
    run.run()
    return run


def statuses(svc, job_ids: list[str]) -> list[JobStatus]:
    return [svc.jobs.get(job_id).status for job_id in job_ids]


def test_a_record_from_before_seeds_were_recorded_runs_with_a_drawn_63_bit_seed(services):
    settings, svc = services
    job_id = admit(svc)
    legacy = svc.jobs.get(job_id)
    legacy = legacy.model_copy(update={"params": legacy.params.model_copy(update={"seed": None})})
    svc.redis.set(svc.jobs.key(job_id), legacy.model_dump_json())
    pipeline = Scripted()
    runtime = install_runtime(settings, pipeline, services=svc)
    tasks.BatchRun(runtime, [attempt(svc, job_id, "worker-a:1")]).run()
    assert svc.jobs.get(job_id).status == JobStatus.succeeded
    ((seed,),) = [call["seed"] for call in pipeline.calls]
    assert isinstance(seed, int) and 2**32 <= seed < 2**63  # below 2**32 by chance: once in 2**31 runs


def test_one_call_carries_each_jobs_own_fields_and_the_batchs_shared_ones(services):
    settings, svc = services
    shared = {
        "steps": 3,
        "guidance_scale": 6.5,
        "negative_prompt": "grain",
        "color_fix": "wavelet",
        "sampler": "unipc",
        "cfg_interval": (0.2, 0.9),
    }
    ids = [
        admit_with(svc, seed=11, prompt="a cat", scale=2, **shared),
        admit_with(svc, seed=12, prompt="a dog", scale=3.5, **shared),
    ]
    seen = []

    def cancel_the_second_during_the_call(call: dict) -> None:
        seen.append([call["is_cancelled"](0), call["is_cancelled"](1)])
        svc.jobs.request_cancel(ids[1])
        time.sleep(0.3)  # past the cancel watch's interval
        seen.append([call["is_cancelled"](0), call["is_cancelled"](1)])

    pipeline = Scripted(cancel_the_second_during_the_call)
    run_batch(settings, svc, pipeline, ids)
    (call,) = pipeline.calls
    assert callable(call.pop("callback")) and callable(call.pop("is_cancelled"))
    assert call == {
        "images": 2,
        "scale": [2.0, 3.5],
        "prompt": ["a cat", "a dog"],
        "seed": [11, 12],
        "num_inference_steps": 3,
        "guidance_scale": 6.5,
        "negative_prompt": "grain",
        "color_fix": "wavelet",
        "tile_size": None,
        "tile_batch_size": 16,
        "max_batch_size": 2,
        "sampler": "unipc",
        "cfg_interval": (0.2, 0.9),
    }
    assert seen == [[False, False], [False, True]]


def test_out_of_memory_halves_the_batch_until_it_fits(services):
    """Four jobs run out of memory, then each pair: 4 → 2 → 1 + 1, twice; every job still succeeds."""
    settings, svc = services
    ids = [admit_with(svc, seed=seed) for seed in (1, 2, 3, 4)]
    pipeline = Scripted(lambda call: RuntimeError(OOM) if call["images"] > 1 else None)
    run_batch(settings, svc, pipeline, ids)
    assert [call["seed"] for call in pipeline.calls] == [[1, 2, 3, 4], [1, 2], [1], [2], [3, 4], [3], [4]]
    assert {(call["tile_size"], call["tile_batch_size"]) for call in pipeline.calls} == {tasks.OOM_TILE_SIZES[0]}
    assert statuses(svc, ids) == [JobStatus.succeeded] * 4


def test_out_of_memory_alone_tries_each_smaller_tile_setting_then_retries_the_job(services):
    """One job that never fits: every (tile size, tiles per batch) in turn, then the job goes back to the
    queue for another attempt (this was its first)."""
    settings, svc = services
    (job_id,) = ids = [admit_with(svc, seed=5)]
    pipeline = Scripted(lambda call: RuntimeError(OOM))
    runtime = install_runtime(settings, pipeline, services=svc)
    tasks.BatchRun(runtime, [attempt(svc, job_id, "worker-a:1")]).run()
    assert [(call["tile_size"], call["tile_batch_size"]) for call in pipeline.calls] == list(tasks.OOM_TILE_SIZES)
    assert statuses(svc, ids) == [JobStatus.queued]
    assert runtime.tile_batch_cap == 1  # the next job starts at one tile per batch, at the tile size it asks for
    assert tasks.OOM_TILE_SIZES[tasks.first_rung(runtime.tile_batch_cap)] == (None, 1)
    assert svc.jobs.get(job_id).owner is None


@pytest.mark.parametrize("seeds", [(21, 22), (21, 22, 23)])
def test_a_batch_that_fails_runs_its_jobs_one_by_one_and_only_the_bad_one_fails(services, seeds):
    settings, svc = services
    ids = [admit_with(svc, seed=seed) for seed in seeds]
    pipeline = Scripted(lambda call: ValueError("cannot read this image") if 22 in call["seed"] else None)
    run_batch(settings, svc, pipeline, ids)
    assert [call["seed"] for call in pipeline.calls] == [list(seeds)] + [[seed] for seed in seeds]
    assert statuses(svc, ids) == [JobStatus.failed if seed == 22 else JobStatus.succeeded for seed in seeds]
    assert svc.jobs.get(ids[1]).error.code == "invalid_input"


@pytest.mark.parametrize("kind", ["fatal", "timeout", "cancelled"])
def test_a_fatal_error_a_timeout_or_a_cancel_is_not_rerun_one_by_one(services, kind):
    """A fatal error leaves the process unusable, a timeout has used up the jobs' time and a cancel is
    the tenants' wish: the batch's jobs end together, after one call."""
    from rq.timeouts import JobTimeoutException

    from megasr_core.pipelines import PipelineCancelled

    error = {
        "fatal": RuntimeError(CUDA_CRASH),
        "timeout": JobTimeoutException("took too long"),
        "cancelled": PipelineCancelled("canceled"),
    }[kind]
    settings, svc = services
    ids = [admit_with(svc, seed=seed) for seed in (31, 32)]
    pipeline = Scripted(lambda call: error)
    if kind == "fatal":
        with pytest.raises(tasks.FatalWorkerError):
            run_batch(settings, svc, pipeline, ids)
    else:
        run_batch(settings, svc, pipeline, ids)
    assert len(pipeline.calls) == 1
    expected = JobStatus.canceled if kind == "cancelled" else JobStatus.failed
    assert statuses(svc, ids) == [expected, expected]


def test_a_job_the_pipeline_stopped_is_canceled_and_its_mates_are_stored(services, monkeypatch):
    """The pipeline hands back None for a job it stopped at its cancel: that job is canceled, the one after
    it is stored under this attempt's key, as its format's content type, with its size, the tagger and full
    progress."""
    settings, svc = services
    ids = [admit_with(svc, seed=seed, output_format="webp") for seed in (41, 42)]
    put = svc.storage.put
    types = {}
    monkeypatch.setattr(
        svc.storage, "put", lambda key, data, kind: (types.__setitem__(key, kind), put(key, data, kind))
    )
    run = run_batch(settings, svc, Scripted(drop={41}), ids)
    stopped, done = (svc.jobs.get(job_id) for job_id in ids)
    assert stopped.status == JobStatus.canceled and stopped.output_key is None
    assert done.status == JobStatus.succeeded and done.progress == 1.0 and done.tagger == "ram"
    assert done.output_key == attempt_output_key(done.id, "worker-a:1", "webp")
    assert types == {done.output_key: "image/webp"}
    stored = Image.open(io.BytesIO(svc.storage.get(done.output_key)))
    assert stored.format == "WEBP" and (done.output_width, done.output_height) == stored.size == (4 * 24, 4 * 16)
    assert finished_count(run.runtime, "succeeded") == 1 and finished_count(run.runtime, "canceled") == 1


def test_a_result_that_cannot_be_stored_fails_only_its_own_job(services, monkeypatch):
    """The store refuses the first job's result on its third attempt: that job fails as transient, and the
    job after it is stored."""
    from service.storage import StorageUnavailable

    settings, svc = services
    ids = [admit_with(svc, seed=seed) for seed in (71, 72)]
    for n in (1, 2):
        svc.jobs.start(ids[0], f"worker-{n}:1")
        svc.jobs.requeue(ids[0], f"worker-{n}:1", None)
    put = svc.storage.put

    def refuse_the_first(key: str, data: bytes, kind: str) -> None:
        if ids[0] in key:
            raise StorageUnavailable("the store is down")
        put(key, data, kind)

    monkeypatch.setattr(svc.storage, "put", refuse_the_first)
    runtime = install_runtime(settings, Scripted(), services=svc)
    runtime.storage_patience_s = 0.0
    tasks.BatchRun(runtime, [attempt(svc, ids[0], "worker-3:1"), attempt(svc, ids[1], "worker-3:2")]).run()
    failed, done = (svc.jobs.get(job_id) for job_id in ids)
    assert failed.status == JobStatus.failed and failed.error.code == "transient"
    assert done.status == JobStatus.succeeded


def test_a_job_taken_over_before_its_result_is_recorded_does_not_stop_its_mates(services):
    """The reaper gives the first job to worker B while the batch runs: A's result for it is dropped (B's
    job stays running), and the job after it is stored."""
    settings, svc = services
    ids = [admit_with(svc, seed=seed) for seed in (81, 82)]

    def hand_the_first_to_b(_call: dict) -> None:
        svc.jobs.requeue(ids[0], "worker-a:0", None)
        svc.jobs.start(ids[0], "worker-b:1")

    run_batch(settings, svc, Scripted(hand_the_first_to_b), ids)
    taken, done = (svc.jobs.get(job_id) for job_id in ids)
    assert taken.status == JobStatus.running and taken.owner == "worker-b:1" and taken.output_key is None
    assert done.status == JobStatus.succeeded


# ------------------------------------------------------------------ what a batch leaves in traces and logs


def test_each_job_of_a_batch_is_a_worker_span_in_its_own_trace_with_the_batchs_stages(services, spans):
    """Each job's span continues the trace its request started, begins when the batch began, and holds the
    pipeline's stages laid end to end from there, then its own upload."""
    settings, svc = services
    ids, requests = [], {}
    for seed in (51, 52):
        with tracing.span("request") as request:
            ids.append(admit_with(svc, seed=seed))
        requests[ids[-1]] = request.context
    before = time.time_ns()
    run = run_batch(settings, svc, Scripted(timings={"denoise": 0.25, "decode": 0.05}), ids)
    finished = spans.get_finished_spans()
    jobs = {span.attributes["megasr.job_id"]: span for span in finished if span.name == "worker.job"}
    assert set(jobs) == set(ids)
    (start,) = {job.start_time for job in jobs.values()}
    assert before <= start <= time.time_ns()
    for job_id, job in jobs.items():
        (parent,) = [span for span in finished if span.context.span_id == job.parent.span_id]
        assert job.context.trace_id == parent.context.trace_id == requests[job_id].trace_id
        assert parent.attributes["megasr.job_id"] == job_id  # the span that recorded the job's carrier
        assert job.attributes["megasr.worker"] == run.runtime.name and job.attributes["megasr.batch_size"] == 2
        children = {span.name: span for span in finished if span.parent and span.parent.span_id == job.context.span_id}
        assert set(children) == {"stage.denoise", "stage.decode", "store"}
        denoise, decode = children["stage.denoise"], children["stage.decode"]
        assert (denoise.start_time, denoise.end_time, decode.end_time) == (
            start,
            start + 250_000_000,
            start + 300_000_000,
        )
        assert decode.attributes["megasr.batch_size"] == 2
        assert dict(children["store"].attributes) == {"megasr.job_id": job_id, "megasr.format": "png"}


def test_a_jobs_result_line_names_the_job_its_tenant_and_the_store_stage(services, captured):
    """Also: each stored job counts the batch's wall time once, and the pipeline's stage times."""
    configure_logging("json", stream=captured)
    settings, svc = services
    ids = [admit_with(svc, seed=seed) for seed in (61, 62)]
    started = time.monotonic()
    run = run_batch(settings, svc, Scripted(timings={"denoise": 0.5, "total": 9.0}), ids)
    took = time.monotonic() - started
    sample = run.runtime.metrics.registry.get_sample_value
    assert sample("megasr_worker_job_seconds_count") == 2 and 0 < sample("megasr_worker_job_seconds_sum") <= 2 * took
    assert sample("megasr_worker_stage_seconds_sum", {"stage": "denoise"}) == 1.0
    for job_id in ids:
        (line,) = [entry for entry in json_lines(captured) if entry["message"].startswith(f"job {job_id}: succeeded (")]
        assert (line["job_id"], line["tenant"], line["stage"]) == (job_id, "default", "store")


def test_an_unknown_format_is_refused_by_the_encoder():
    image = Image.new("RGB", (4, 4))
    with pytest.raises(ValueError, match="output format must be one of png, jpeg, webp, got 'gif'"):
        encode(image, "gif")
