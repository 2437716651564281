"""``/v1/upscale`` and ``/v1/jobs``: submit, list, poll, follow (SSE), fetch the result, cancel."""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from starlette.datastructures import UploadFile

from .. import events
from ..body_limits import loads_limited, parse_multipart, read_limited
from ..contracts import (
    CONTENT_TYPES,
    ErrorResponse,
    ImageSize,
    JobList,
    JobMetrics,
    JobRecord,
    JobStatus,
    JobUrls,
    JobView,
    UpscaleParams,
    UpscaleRequest,
)
from ..deps import ServicesDep, TenantDep, limit_reads
from ..errors import ApiError
from ..images import check_upload
from ..jobsystem import admission, lifecycle
from ..jobsystem.store import ListPosition, TransitionRejected
from ..logging_setup import fresh_log_context
from ..prefer_wait import MAX_WAIT_S, preferred_wait, wait_until_final
from ..storage import ObjectNotFound, StoredObject
from ..tracing import traced

router = APIRouter(prefix="/v1", tags=["jobs"])

#: body bytes allowed on top of the image: multipart framing and the text parameters
_FIELDS_OVERHEAD = 64 * 1024


def _param_schemas() -> dict[str, dict]:
    """UpscaleParams' fields as JSON Schema (types, bounds, enums), "null" dropped: a form field is
    either sent or not."""
    schema = UpscaleRequest.model_json_schema()
    properties = {}
    for name, prop in schema["properties"].items():
        variants = [v for v in prop.pop("anyOf", []) if v.get("type") != "null"]
        if len(variants) == 1:
            prop.update(variants[0])
        elif variants:
            prop["anyOf"] = variants
        if prop.get("default", 0) is None:
            del prop["default"]
        properties[name] = prop
    return properties


def _upload_schema() -> dict:
    params = _param_schemas()
    return {
        "parameters": [
            {
                "name": "Prefer",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": f"wait=N: answer 200 with the finished job if it finishes within N seconds (at most "
                f"{MAX_WAIT_S}; `wait` alone = {MAX_WAIT_S}), else the usual 202",
            },
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                "description": "a retry with the same key and request answers the same job (for a day)",
            },
        ],
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {"image": {"type": "string", "format": "binary"}, **params},
                    },
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "additionalProperties": False,
                        "properties": {
                            "image": {"type": "string", "description": "data:image/...;base64,... URL"},
                            **params,
                        },
                    },
                },
            },
        },
    }


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses of these error statuses, each ``{"error": {"code", "message"}}``."""
    described = {
        400: "Bad request",
        401: "Missing or invalid API key",
        404: "No such job (of this tenant)",
        409: "Not possible in the job's state",
        413: "Upload too large",
        415: "Unsupported media type",
        422: "Invalid parameters",
        429: "Rate limit or queue quota",
        503: "Redis or storage unreachable",
    }
    return {status: {"model": ErrorResponse, "description": described[status]} for status in statuses}


def _link(request: Request, services: ServicesDep, route: str, job_id: str) -> str:
    """A link to a route: under ``MEGASR_PUBLIC_URL`` when set, else root-relative. Never built
    from the request's Host header, which the client controls."""
    path = request.app.url_path_for(route, job_id=job_id)
    public_url = services.settings.public_url
    return f"{public_url.rstrip('/')}{path}" if public_url else f"{request.scope.get('root_path', '')}{path}"


def _view(record: JobRecord, request: Request, services: ServicesDep) -> JobView:
    position = services.queue_for(record.model).position(record.id) if record.status == JobStatus.queued else None
    cancel = record.status == JobStatus.running and services.jobs.cancel_requested(record.id)
    return _view_of(record, request, services, position, cancel)


def _view_of(
    record: JobRecord, request: Request, services: ServicesDep, queue_position: int | None, cancel_requested: bool
) -> JobView:
    """The view of a record whose queue position and cancel flag were read already (the event
    poller reads them for all streams at once); no Redis calls, so safe on the event loop."""
    position = queue_position if record.status == JobStatus.queued else None
    result_url = _link(request, services, "get_result", record.id) if record.status == JobStatus.succeeded else None
    return JobView(
        id=record.id,
        status=record.status,
        model=record.model,
        model_info=record.model_info,
        progress=record.progress,
        queue_position=position,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        input=ImageSize(width=record.input_width, height=record.input_height),
        output=ImageSize(width=record.output_width, height=record.output_height) if record.output_width else None,
        tagger=record.tagger,
        error=record.error,
        result_url=result_url,
        cancel_requested=record.status == JobStatus.running and cancel_requested,
        params=record.params,
        metrics=JobMetrics.of(record),
        urls=JobUrls(
            get=_link(request, services, "get_job", record.id),
            cancel=_link(request, services, "cancel_job", record.id),
            stream=_link(request, services, "stream_job_events", record.id),
            input=_link(request, services, "get_input", record.id),
            result=result_url,
        ),
    )


async def _read_request(request: Request, max_bytes: int) -> tuple[bytes, str | None, dict[str, Any]]:
    """The image bytes, their declared type and the raw parameters, from multipart or JSON.

    The body is counted as it arrives (chunked or not) and cut off with a 413 at the image limit
    plus its encoding's overhead, before anything over it is buffered or spooled.
    """
    detail = f" (MEGASR_MAX_UPLOAD_BYTES allows a {max_bytes:,} byte image)"
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await parse_multipart(
            request,
            max_bytes + _FIELDS_OVERHEAD,
            max_files=1,
            max_fields=len(UpscaleParams.model_fields) + 1,
            detail=detail,
        )
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise ApiError(422, "invalid_parameters", "image: a file field named 'image' is required")
            data = await upload.read(max_bytes + 1)
            fields = {k: v for k, v in form.items() if k != "image"}
            return data, upload.content_type, fields
        finally:
            await form.close()
    if content_type == "application/json":
        body = await read_limited(request, 4 * math.ceil(max_bytes / 3) + _FIELDS_OVERHEAD, detail)
        payload = await run_in_threadpool(loads_limited, body)  # up to ~27 MB: off the event loop
        if not isinstance(payload, dict):
            raise ApiError(422, "invalid_parameters", "the JSON body must be an object")
        image = payload.pop("image", None)
        if not isinstance(image, str) or not image.startswith("data:"):
            raise ApiError(
                422, "invalid_parameters", "image: a data URL string (data:image/png;base64,...) is required"
            )
        header, _, encoded = image.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(422, "invalid_parameters", "image: the data URL must be base64-encoded")
        if len(encoded) > 4 * math.ceil(max_bytes / 3):  # the base64 length of max_bytes
            raise ApiError(413, "upload_too_large", f"the image is over the {max_bytes:,} byte limit")
        try:
            data = await run_in_threadpool(base64.b64decode, encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "invalid_base64", "image: the data URL is not valid base64") from None
        return data, header[5:].split(";")[0] or None, payload
    raise ApiError(415, "unsupported_media_type", "send multipart/form-data (field 'image') or application/json")


@router.post(
    "/upscale",
    status_code=202,
    response_model=JobView,
    openapi_extra=_upload_schema(),
    operation_id="createUpscaleJob",
    responses={
        200: {"model": JobView, "description": "Prefer: wait=N, and the job finished within N seconds"},
        **_errors(400, 401, 413, 415, 422, 429, 503),
    },
)
async def submit(request: Request, services: ServicesDep, tenant: TenantDep) -> Response:
    """Queue an image for super-resolution; answers 202 with the job and its ``Location``."""
    settings = services.settings
    rate = await run_in_threadpool(services.request_rate.take, tenant)
    if not rate.allowed:
        raise ApiError(
            429,
            "rate_limited",
            f"over {settings.rate_limit_per_minute} submissions a minute "
            f"(bursts of {settings.rate_limit_burst}); retry in {rate.retry_after_header} s",
            {"Retry-After": rate.retry_after_header},
        )
    data, declared_type, fields = await _read_request(request, settings.max_upload_bytes)
    idempotency_key = request.headers.get("idempotency-key")
    # Decoding, the storage write and the Redis calls block: keep them off the event loop.
    record, replayed = await run_in_threadpool(_admit, services, tenant, data, declared_type, fields, idempotency_key)
    view = await run_in_threadpool(_view, record, request, services)
    headers = {"Location": _link(request, services, "get_job", record.id)}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    wait_s = preferred_wait(request.headers.getlist("prefer"))
    if wait_s is not None and not view.status.is_final and wait_s > 0:
        view = await _wait_for_final(request, services, tenant, record, wait_s) or view
    if wait_s is not None and view.status.is_final:  # finished within the wait: 200, as a GET would say
        headers["Preference-Applied"] = f"wait={wait_s}"
        return JSONResponse(view.model_dump(mode="json"), status_code=200, headers=headers)
    return JSONResponse(view.model_dump(mode="json"), status_code=202, headers=headers)


async def _wait_for_final(
    request: Request, services: ServicesDep, tenant: str, record: JobRecord, seconds: int
) -> JobView | None:
    """The job's view once it is final within ``seconds`` (``service.prefer_wait``), else None."""

    def final_view(snapshot) -> JobView | None:
        found = snapshot.record
        if found is None or found.tenant != tenant or not found.status.is_final:
            return None
        return _view_of(found, request, services, snapshot.position, snapshot.cancel_requested)

    streams = events.event_streams(request.app, services.settings, services.redis)
    queue_key = services.queue_for(record.model).queue.key
    return await wait_until_final(streams, tenant, record.id, queue_key, seconds, final_view, request.is_disconnected)


@fresh_log_context  # the job id and tenant it binds end with it, whoever calls it
@traced("enqueue")  # validation, input upload, record and RQ enqueue; the worker continues this span
def _admit(
    services: ServicesDep,
    tenant: str,
    data: bytes,
    declared_type: str | None,
    fields: dict[str, Any],
    idempotency_key: str | None,
) -> tuple[JobRecord, bool]:
    """Validate, store the input, record and enqueue the job (``service.jobsystem.admission``); (record, replayed)."""
    settings = services.settings
    try:
        params, model = admission.check_request(settings, fields, idempotency_key)
        image = check_upload(
            data,
            declared_type,
            settings.max_upload_bytes,
            settings.max_input_pixels,
            max_jpeg_scans=settings.max_jpeg_scans,
            max_decode_seconds=settings.max_decode_seconds,
        )
        return admission.admit(services, tenant, data, image, params, model, idempotency_key)
    except admission.Refused as exc:
        raise ApiError(exc.status, exc.code, exc.message, exc.headers) from None


def _owned(services: ServicesDep, job_id: str, tenant: str) -> JobRecord:
    record = services.jobs.get_for_tenant(job_id, tenant) if len(job_id) <= 64 else None
    if record is None:
        raise ApiError(404, "job_not_found", f"no job {job_id!r}")
    return record


def _encode_cursor(position: ListPosition) -> str:
    raw = json.dumps([position.score, position.job_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _refuse_constant(name: str) -> float:
    """``parse_constant`` for cursors: NaN and ±Infinity are no position (Python's json takes them)."""
    raise ValueError(f"{name} in a cursor")


def _decode_cursor(cursor: str) -> ListPosition:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        score, job_id = json.loads(raw, parse_constant=_refuse_constant)
        if not isinstance(score, (int, float)) or isinstance(score, bool) or not isinstance(job_id, str):
            raise ValueError(cursor)
        position = ListPosition(float(score), job_id)
        if not math.isfinite(position.score):  # 1e999 parses as inf
            raise ValueError(cursor)
        return position
    except (ValueError, TypeError, binascii.Error):
        raise ApiError(422, "invalid_cursor", "cursor: not a cursor this API returned") from None


@router.get(
    "/jobs",
    response_model=JobList,
    name="list_jobs",
    operation_id="listJobs",
    dependencies=[Depends(limit_reads)],
    responses=_errors(401, 422, 429),
)
def list_jobs(
    request: Request,
    services: ServicesDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100, description="jobs per page")] = 20,
    cursor: Annotated[str | None, Query(max_length=200, description="the `next` of the previous page")] = None,
    status: Annotated[list[JobStatus] | None, Query(description="only jobs in these states (repeatable)")] = None,
) -> JobList:
    """The caller's jobs, newest first, a page at a time (jobs are kept ``MEGASR_RESULT_TTL_S``
    after they finish)."""
    after = _decode_cursor(cursor) if cursor is not None else None
    records, position = services.jobs.list_for_tenant(tenant, limit, after, status or ())
    return JobList(
        jobs=[_view(r, request, services) for r in records],
        next=_encode_cursor(position) if position is not None else None,
    )


@router.get(
    "/jobs/{job_id}",
    response_model=JobView,
    name="get_job",
    operation_id="getJob",
    dependencies=[Depends(limit_reads)],
    responses=_errors(401, 404, 429),
)
def get_job(job_id: str, request: Request, services: ServicesDep, tenant: TenantDep) -> JobView:
    """Status, progress, queue position, times, sizes, error and result link of a job."""
    return _view(_owned(services, job_id, tenant), request, services)


@router.get(
    "/jobs/{job_id}/events",
    name="stream_job_events",
    operation_id="streamJobEvents",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-Sent Events: `progress` (the job), then `done` (the final job)",
            "content": {events.MEDIA_TYPE: {"schema": {"type": "string"}}},
        },
        **_errors(401, 404, 429, 503),
    },
)
async def stream_job_events(job_id: str, request: Request, services: ServicesDep, tenant: TenantDep) -> Response:
    """Follow a job: its progress as it changes, then its final state, as Server-Sent Events
    (``MEGASR_MAX_EVENT_STREAMS_PER_TENANT`` open at once per API process, then 429)."""
    record = await run_in_threadpool(_owned, services, job_id, tenant)
    streams = events.event_streams(request.app, services.settings, services.redis)
    slot = streams.slots.acquire(tenant)  # 429/503 too_many_streams; given back by on_close
    follow = streams.poller.follow(job_id, services.queue_for(record.model).queue.key)
    last: tuple[object, JobView | None] = (None, None)  # a view is built once per change, not per wake-up

    async def load() -> JobView | None:
        nonlocal last
        snapshot = await follow.latest()
        if snapshot is not last[0]:
            found = snapshot.record
            view = (
                None
                if found is None or found.tenant != tenant
                else _view_of(found, request, services, snapshot.position, snapshot.cancel_requested)
            )
            last = (snapshot, view)
        return last[1]

    def on_close() -> None:
        follow.close()
        slot.release()

    stream = events.job_events(
        load, request.is_disconnected, max_seconds=services.settings.events_max_s, wait=follow.wait_change
    )
    return events.EventStreamResponse(stream, on_close)


@router.get(
    "/jobs/{job_id}/result",
    name="get_result",
    operation_id="getJobResult",
    responses={
        200: {
            "description": "The result image",
            "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in CONTENT_TYPES.values()},
        },
        307: {"description": "Redirect to a presigned storage URL"},
        **_errors(401, 404, 409, 429),
    },
    dependencies=[Depends(limit_reads)],
)
def get_result(job_id: str, services: ServicesDep, tenant: TenantDep) -> Response:
    """The result image (streamed from storage), or a redirect to a presigned URL when the storage is S3."""
    record = _owned(services, job_id, tenant)
    if record.status != JobStatus.succeeded or record.output_key is None:
        raise ApiError(409, "not_ready", f"job {job_id} is {record.status.value}, not succeeded")
    url = services.storage.presigned_url(record.output_key, services.settings.presign_ttl_s)
    if url:
        return RedirectResponse(url, status_code=307)
    return _streamed(services.storage.open(record.output_key), CONTENT_TYPES[record.params.output_format])


@router.get(
    "/jobs/{job_id}/input",
    name="get_input",
    operation_id="getJobInput",
    responses={
        200: {
            "description": "The uploaded image, as it was sent",
            "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
        },
        **_errors(401, 404, 429),
    },
    dependencies=[Depends(limit_reads)],
)
def get_input(job_id: str, services: ServicesDep, tenant: TenantDep) -> Response:
    """The job's input image as uploaded (kept as long as the job), so a client can show before
    and after side by side later."""
    record = _owned(services, job_id, tenant)
    try:
        stored = services.storage.open(record.input_key)
    except ObjectNotFound:
        raise ApiError(404, "input_gone", f"the input of job {job_id} is no longer stored") from None
    return _streamed(stored, record.input_content_type)


def _streamed(stored: StoredObject, media_type: str) -> StreamingResponse:
    """A stored image streamed to the client in chunks, with its length when the storage knows it."""
    headers = {"Content-Length": str(stored.size)} if stored.size is not None else None
    return StreamingResponse(stored.chunks, media_type=media_type, headers=headers)


@router.delete(
    "/jobs/{job_id}",
    response_model=JobView,
    operation_id="cancelJob",
    responses={
        202: {"model": JobView, "description": "Cancel requested (the job is running)"},
        **_errors(401, 404, 409),
    },
)
def cancel_job(job_id: str, request: Request, services: ServicesDep, tenant: TenantDep) -> Response:
    """Cancel: a queued job at once (200), a running one within one denoising step (202)."""
    record = _owned(services, job_id, tenant)
    if record.status.is_final:
        raise ApiError(409, "already_finished", f"job {job_id} is already {record.status.value}")
    if record.status == JobStatus.queued:
        try:
            # The record's cancel and its removal from RQ's queue: one transaction.
            record = lifecycle.cancel_queued(services.jobs, services.queue_for(record.model), job_id)
            return JSONResponse(_view(record, request, services).model_dump(mode="json"), status_code=200)
        except TransitionRejected:
            record = services.jobs.get(job_id) or record  # a worker picked it up meanwhile
    services.jobs.request_cancel(job_id)
    return JSONResponse(_view(record, request, services).model_dump(mode="json"), status_code=202)
