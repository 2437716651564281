"""What the service and worker tests share: settings for a test's app, a test image, submitting a job,
running the queue in-process, waiting for a job, reading JSON logs, and a model-free pipeline stand-in."""

from __future__ import annotations

import io
import json
import time
import uuid
from types import SimpleNamespace

from PIL import Image
from rq.worker import SimpleWorker
from skimage import data

from megasr_core.identity import ModelIdentity
from service.config import Settings
from service.contracts import JobRecord, JobStatus, UpscaleParams
from service.jobsystem.store import JobStore
from service.routes.jobs import _admit
from worker.main import make_worker
from worker.runtime import install_runtime

KEY_A, KEY_B = "alpha-key-123456", "beta-key-1234567"
#: the result TTL of the ``store`` fixture's JobStore
STORE_RESULT_TTL_S = 600


def png(width: int = 24, height: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_settings(tmp_path, redis_url, **changes) -> Settings:
    values = dict(
        redis_url=redis_url,
        storage_url=(tmp_path / "data").as_uri(),
        home=tmp_path,
        queue_name=f"test-{uuid.uuid4().hex[:8]}",
        rate_limit_per_minute=10_000,
        rate_limit_burst=10_000,
        allow_anonymous=True,
        max_upload_bytes=2_000_000,
        max_input_pixels=1_000_000,
    )
    values.update(changes)
    return Settings(**values)


def run_worker(settings, pipeline) -> None:
    """Run every queued job in this process, as `megasr worker --burst` would."""
    runtime = install_runtime(settings, pipeline)
    connection = runtime.services.redis
    make_worker(SimpleWorker, connection, settings.queue_name).work(burst=True)  # JSON jobs, fair dequeue


def form_fields(fields: dict) -> dict[str, str]:
    """Request parameters as multipart form text: a pair such as cfg_interval=(0, 0.5) as "0,0.5"."""
    return {k: ",".join(map(str, v)) if isinstance(v, tuple) else str(v) for k, v in fields.items()}


def submit(client, image: bytes = None, headers=None, **fields):
    files = {"image": ("photo.png", image if image is not None else png(), "image/png")}
    return client.post("/v1/upscale", files=files, data=form_fields(fields), headers=headers or {})


def wait_for(client, job_id: str, predicate, timeout: float) -> dict:
    """The job's JSON once ``predicate`` holds for it, polled through the API; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if predicate(job):
            return job
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id}: {client.get(f'/v1/jobs/{job_id}').json()}")


def admit(services) -> str:
    """A job admitted for tenant ``default`` as the upload route admits it (2 steps, seed 1); its id."""
    record, replayed = _admit(services, "default", png(), "image/png", {"steps": "2", "seed": "1"}, None)
    assert not replayed
    return record.id


def finish_with_webhook(store: JobStore, url: str) -> str:
    """A job with ``webhook_url`` canceled: the final transition schedules its delivery."""
    job_id = uuid.uuid4().hex
    record = JobRecord(
        id=job_id,
        tenant="hooks",
        params=UpscaleParams(webhook_url=url),
        input_key=f"jobs/{job_id}/input",
        input_width=8,
        input_height=8,
    )
    store.create(record)
    store.finish(job_id, JobStatus.canceled)
    return job_id


def json_lines(stream: io.StringIO) -> list[dict]:
    """The JSON log lines written into ``stream`` (the ``captured`` fixture), parsed."""
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


class StandIn:
    """The pipeline's calling convention, without a model: each image comes back 4× larger in
    ``colour``, or the call raises ``error``. Its ``identity`` is a real one (of no weights)."""

    identity = ModelIdentity("megasr", "stand-in", "float32", ("a stand-in pipeline, no model",))

    def __init__(self, colour: str = "red", error: BaseException | None = None) -> None:
        self.colour, self.error = colour, error

    def __call__(self, images, scale=4, **kwargs):
        if self.error is not None:
            raise self.error
        images = [Image.new("RGB", (im.size[0] * 4, im.size[1] * 4), self.colour) for im in images]
        return SimpleNamespace(images=images, timings={})
