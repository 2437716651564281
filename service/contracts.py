"""The typed boundary between the API and the worker: job parameters, states, records, names.

The API validates requests into :class:`UpscaleParams`, stores a :class:`JobRecord` in Redis
and enqueues :data:`WORKER_TASK` on the queue of the job's model (``Settings.queue_for``: the
model :data:`DEFAULT_MODEL` uses :data:`DEFAULT_QUEUE`); the worker reads the same record and
writes the :class:`ModelInfo` of the model that ran it. No torch here: the API process never
imports it.
"""

from __future__ import annotations

import enum
import math
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, UrlConstraints, computed_field, field_validator

from megasr_core.parameters import SAMPLERS, cfg_interval_problem, default_steps

DEFAULT_QUEUE = "megasr"
#: the name of the one model of a deployment that names none (``MEGASR_MODEL``/``MEGASR_MODELS`` unset)
DEFAULT_MODEL = "default"
#: what a model name may look like: it becomes part of a queue name and of Redis keys
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
#: dotted path RQ imports in the worker (the API never imports it)
WORKER_TASK = "worker.tasks.upscale"

OutputFormat = Literal["png", "jpeg", "webp"]
ColorFix = Literal["adain", "wavelet", "none"]
#: ``megasr_core.parameters.SAMPLERS``: DDPM (the paper's) or an opt-in faster solver
SamplerName = Literal["ddpm", "dpmpp-2m", "unipc"]
#: longest webhook URL a job may carry (the record lives in Redis; browsers cap URLs near here too)
MAX_WEBHOOK_URL_LENGTH = 2048
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
ModelName = Annotated[
    str, Field(pattern=MODEL_NAME_PATTERN, description="a model this deployment serves (GET /v1/models)")
]


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)


class UpscaleParams(BaseModel):
    """What a client may ask for; everything else is decided by the service."""

    model_config = ConfigDict(extra="forbid")

    #: None: the deployment's default model; the API stores the name it resolved
    model: ModelName | None = None
    scale: Annotated[float, Field(ge=1, le=8)] = 4
    #: None: the model's own default (GET /v1/models: ``default_steps``, ``default_guidance_scale``)
    steps: Annotated[int, Field(ge=1, le=200, description="denoising steps; omitted: the model's default")] | None = (
        None
    )
    guidance_scale: (
        Annotated[float, Field(ge=0, le=20, description="classifier-free guidance; omitted: the model's default")]
        | None
    ) = None
    # lt rather than le=2**63 - 1: OpenAPI numbers are floats, and 2**63 is exact as one
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    prompt: Annotated[str, Field(max_length=500)] = ""
    negative_prompt: Annotated[str, Field(max_length=500)] = "dotted, noise, blur, lowres, smooth"
    color_fix: ColorFix = "adain"
    sampler: SamplerName = Field(
        "ddpm",
        description="ddpm: the paper's sampler; dpmpp-2m (25 steps) and unipc (20) are faster and change the output",
    )
    cfg_interval: tuple[float, float] | None = Field(
        None,
        description="[start, end]: fractions of the schedule whose steps run classifier-free guidance "
        "(the others run half the model batch; a form field: 'start,end'); omitted: every step",
    )
    output_format: OutputFormat = "png"
    webhook_url: Annotated[AnyHttpUrl, UrlConstraints(max_length=MAX_WEBHOOK_URL_LENGTH)] | None = None

    @field_validator("scale", "steps", "guidance_scale", "seed", mode="before")
    @classmethod
    def _not_boolean(cls, value: object) -> object:
        # JSON true/false would otherwise pass as 1/0: a client that sends them has a bug to hear about.
        if isinstance(value, bool):
            raise ValueError("must be a number, not true/false")
        return value

    @field_validator("cfg_interval", mode="before")
    @classmethod
    def _interval_from_a_form(cls, value: object) -> object:
        # A multipart form sends text: "0,0.6".
        if isinstance(value, str):
            parts = value.split(",")
            try:
                return tuple(float(part) for part in parts) if len(parts) == 2 else value
            except ValueError:
                return value
        return value

    @field_validator("cfg_interval")
    @classmethod
    def _an_interval(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        message = cfg_interval_problem(value)
        if message is not None:
            raise ValueError(message)
        return value

    @field_validator("scale", "guidance_scale")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


#: the largest seed a request may name or the API draws: 2**53 − 1, the largest integer a JavaScript
#: number holds exactly, so a browser client can read a job's seed back and reproduce it
MAX_SEED = 2**53 - 1


class UpscaleRequest(UpscaleParams):
    """What ``POST /v1/upscale`` accepts: :class:`UpscaleParams` with seeds JavaScript can hold.
    Stored records keep the wider :class:`UpscaleParams` (jobs from before the bound still load)."""

    seed: Annotated[int, Field(ge=0, le=MAX_SEED, description="random seed: same seed, same output")] | None = None


class JobError(BaseModel):
    code: str
    message: str


class ModelInfo(BaseModel):
    """A served model as the worker that loaded it describes it: ``name`` (what requests route
    by) and ``megasr_core.identity.ModelIdentity.to_dict()`` (family, weights, whether trained)."""

    name: str
    family: str
    title: str
    weights: str
    dtype: str
    #: the denoiser's linear layers: "full" (as loaded, ``dtype``) or "fp8" (float8 GEMMs)
    precision: str = "full"
    tagger: str | None = None
    trained: bool
    untrained_reason: str | None = None
    default_steps: int
    default_guidance_scale: float


class JobRecord(BaseModel):
    """A job as stored in Redis (metadata only: images live in storage)."""

    id: str
    tenant: str
    status: JobStatus = JobStatus.queued
    params: UpscaleParams
    #: the model it was routed to (the API resolves a missing ``params.model`` to the default)
    model: str = DEFAULT_MODEL
    #: the model that ran it, written by that worker when the job finishes after a run
    model_info: ModelInfo | None = None
    progress: float = 0.0
    input_key: str
    input_content_type: str = "application/octet-stream"
    input_width: int
    input_height: int
    output_key: str | None = None
    output_width: int | None = None
    output_height: int | None = None
    tagger: str | None = None  # which tagger made the prompt: "ram" (the paper's) or "clip-zero-shot" (fallback)
    error: JobError | None = None
    attempts: int = 0
    owner: str | None = None  # the worker attempt running it (fencing token)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    started_at: datetime | None = None
    finished_at: datetime | None = None
    trace_context: dict[str, str] | None = None  # W3C traceparent carrier: the worker continues the API's trace


class ImageSize(BaseModel):
    width: int
    height: int


class JobMetrics(BaseModel):
    """How long a job waited and ran, in seconds (Replicate's ``metrics``); null until known."""

    queue_s: float | None = Field(None, description="from submission to the start of its last run")
    predict_s: float | None = Field(None, description="from the start of its last run to its end")

    @classmethod
    def of(cls, record: JobRecord) -> JobMetrics:
        def seconds(start: datetime | None, end: datetime | None) -> float | None:
            return None if start is None or end is None else round(max(0.0, (end - start).total_seconds()), 3)

        return cls(
            queue_s=seconds(record.created_at, record.started_at),
            predict_s=seconds(record.started_at, record.finished_at),
        )


class JobUrls(BaseModel):
    """Where to act on a job: absolute links under ``MEGASR_PUBLIC_URL``, else root-relative."""

    get: str = Field(description="GET: the job")
    cancel: str = Field(description="DELETE: cancel it")
    stream: str = Field(description="GET: its progress as Server-Sent Events")
    input: str = Field(description="GET: the uploaded image")
    result: str | None = Field(None, description="GET: the result image, once it succeeded")


class JobView(BaseModel):
    """What clients see of a job (the API's answers, its event stream and ``megasr_client``)."""

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
    params: UpscaleParams
    metrics: JobMetrics = Field(default_factory=JobMetrics)
    #: null only in views built without a request (an older server's answers)
    urls: JobUrls | None = None


class JobList(BaseModel):
    """One page of a tenant's jobs, newest first; ``next`` is the cursor of the following page."""

    jobs: list[JobView]
    next: str | None = None


class ServedModel(BaseModel):
    """A model this deployment routes requests to (``GET /v1/models``). The identity fields are
    what its workers announced (``service.models_registry``): null until one has."""

    name: str
    default: bool = Field(description="the model of a request that names none")
    workers: int = Field(description="workers serving it now")
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

    @computed_field(description="the steps a job that names none takes, per sampler")  # type: ignore[prop-decorator]
    @property
    def sampler_steps(self) -> dict[str, int] | None:
        if self.default_steps is None:
            return None
        return {name: default_steps(name, self.default_steps) for name in SAMPLERS}


class ModelList(BaseModel):
    """Every served model, the default first."""

    models: list[ServedModel]


class ErrorResponse(BaseModel):
    """Every error the API answers: ``{"error": {"code", "message"}}``."""

    error: JobError


def input_key(job_id: str) -> str:
    return f"jobs/{job_id}/input"


def output_key(job_id: str, fmt: str) -> str:
    return f"jobs/{job_id}/output.{'jpg' if fmt == 'jpeg' else fmt}"


def attempt_output_key(job_id: str, owner: str, fmt: str) -> str:
    """Where one attempt (its owner token) writes its result: a late attempt of a job another
    attempt has finished writes beside the result, never over it; the record names the one."""
    attempt = "".join(c if c.isalnum() or c in "-_" else "-" for c in owner)
    return f"jobs/{job_id}/{attempt}/output.{'jpg' if fmt == 'jpeg' else fmt}"
