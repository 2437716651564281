"""The API's answers as typed objects: jobs, pages of jobs, served models.

These mirror the server's response schemas (``/openapi.json``: ``JobView``, ``JobList``,
``ServedModel``), leniently: a field a newer server adds is ignored and one an older server lacks
takes its default, so this client keeps working across upgrades. A test checks every field here
against the server's models.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, protected_namespaces=())


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)


class ImageSize(_Answer):
    width: int
    height: int


class JobError(_Answer):
    """Why a job failed: a stable ``code`` and a message for people."""

    code: str
    message: str


class ModelInfo(_Answer):
    """The model that ran a job, as its worker described it."""

    name: str
    family: str
    title: str
    weights: str
    dtype: str
    precision: str = "full"
    tagger: str | None = None
    trained: bool
    untrained_reason: str | None = None
    default_steps: int
    default_guidance_scale: float


class JobParams(_Answer):
    """What the job was asked for (the seed as drawn when none was given)."""

    model: str | None = None
    scale: float
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    prompt: str = ""
    negative_prompt: str = ""
    color_fix: str = "adain"
    sampler: str = "ddpm"
    cfg_interval: tuple[float, float] | None = None
    output_format: str = "png"
    webhook_url: str | None = None


class JobMetrics(_Answer):
    """Seconds waited in the queue and spent running (None until known)."""

    queue_s: float | None = None
    predict_s: float | None = None


class JobUrls(_Answer):
    """Where to act on the job (absolute when the server has a public URL)."""

    get: str
    cancel: str
    stream: str
    input: str | None = None
    result: str | None = None


class Job(_Answer):
    """A job as the API shows it."""

    id: str
    status: JobStatus
    model: str
    model_info: ModelInfo | None = None
    progress: float
    queue_position: int | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    input: ImageSize
    output: ImageSize | None = None
    tagger: str | None = None
    error: JobError | None = None
    result_url: str | None = None
    cancel_requested: bool = False
    params: JobParams
    metrics: JobMetrics = JobMetrics()
    urls: JobUrls | None = None


class JobPage(_Answer):
    """One page of jobs, newest first; ``next`` is the cursor of the following page (None: the last)."""

    jobs: list[Job]
    next: str | None = None


class Model(_Answer):
    """A served model; its identity fields are None until a worker serving it has announced them."""

    name: str
    default: bool
    workers: int
    family: str | None = None
    title: str | None = None
    weights: str | None = None
    dtype: str | None = None
    precision: str | None = None
    tagger: str | None = None
    trained: bool | None = None
    untrained_reason: str | None = None
    default_steps: int | None = None
    default_guidance_scale: float | None = None
    sampler_steps: dict[str, int] | None = None  # the steps a job naming none takes, per sampler


def parse_models(answer: dict[str, Any]) -> list[Model]:
    """``GET /v1/models``'s answer: the served models, the default first."""
    return [Model.model_validate(item) for item in answer["models"]]
