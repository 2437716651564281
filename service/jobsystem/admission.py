"""Whether a submission is taken: its parameters, its model, its work bounds, its Idempotency-Key
and its tenant's quota; then its record, its stored input and its enqueue (``lifecycle.submit``).

No HTTP here: a refusal is a :class:`Refused` with the status and code the API answers with
(``service.routes.jobs`` turns it into its error response). The upload itself (size, type,
decoding) is checked by the HTTP layer (``service.images``) between :func:`check_request` and
:func:`admit`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from megasr_core.geometry import SD2_SIZE_MULTIPLE, WorkBoundsError, check_work_bounds
from service.config import Settings
from service.contracts import MAX_SEED, JobRecord, UpscaleParams, UpscaleRequest, input_key
from service.logging_setup import bind_log_context
from service.tracing import carrier
from service.webhooks import check_webhook_url

from . import lifecycle
from .services import Services
from .store import IdempotencyMismatch, QuotaExceeded

#: what a request that names no model hashes for steps and guidance it leaves out: the defaults of
#: the releases before models, so a key keeps matching its request across a rolling upgrade
_LEGACY_SAMPLING = {"steps": 50, "guidance_scale": 5.5}


class Refused(Exception):
    """A submission the service does not take: the API answers ``status`` with ``code``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class UploadedImage(Protocol):
    """A decoded and accepted upload (``service.images.CheckedImage``)."""

    data: bytes
    content_type: str
    width: int
    height: int


#: request fields added after the fingerprint's canonical form was fixed, with their defaults
_ADDED_FIELDS: dict[str, Any] = {"sampler": "ddpm", "cfg_interval": None}


def request_fingerprint(image: bytes, params: BaseModel) -> str:
    """sha256 of what a submission asks for: the image bytes and the validated parameters
    (normalized: defaults filled in, keys sorted), bound to an Idempotency-Key.

    A request that names no model hashes exactly as before models existed (no ``model`` key,
    left-out steps and guidance as 50 and 5.5; an Idempotency-Key lives a day, across upgrades);
    one that names a model hashes the name and what it left out as null. Fields added since
    (:data:`_ADDED_FIELDS`) count only when they differ from their defaults, so a request hashes
    as it did in the release before them.
    """
    fields = params.model_dump(mode="json")
    for name, default in _ADDED_FIELDS.items():
        if fields.get(name, default) == default:
            fields.pop(name, None)
    if "model" in fields and fields["model"] is None:
        del fields["model"]
        fields.update({name: value for name, value in _LEGACY_SAMPLING.items() if fields.get(name, value) is None})
    digest = hashlib.sha256()
    digest.update(hashlib.sha256(image).digest())
    digest.update(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


def check_request(settings: Settings, fields: dict[str, Any], idempotency_key: str | None) -> tuple[UpscaleParams, str]:
    """The validated parameters and the served model they route to; :class:`Refused` (422) otherwise."""
    try:
        params = UpscaleParams.model_validate(UpscaleRequest.model_validate(fields).model_dump())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "parameters"
        raise Refused(422, "invalid_parameters", f"{where}: {first.get('msg', 'invalid')}") from None
    model = resolve_model(settings, params.model)
    if params.webhook_url is not None:
        if settings.webhook_secret is None:
            raise Refused(422, "invalid_parameters", "webhook_url: webhooks are off (MEGASR_WEBHOOK_SECRET is not set)")
        try:
            check_webhook_url(str(params.webhook_url), settings.webhook_allow_private)
        except ValueError as exc:
            raise Refused(422, "invalid_parameters", f"webhook_url: {exc}") from None
    if idempotency_key is not None and not (1 <= len(idempotency_key) <= 200):
        raise Refused(422, "invalid_parameters", "Idempotency-Key must be 1 to 200 characters")
    return params, model


def resolve_model(settings: Settings, name: str | None) -> str:
    """The served model a request names, or the default one; :class:`Refused` ``unknown_model`` otherwise."""
    served = settings.served_models()
    if name is None:
        return served[0]
    if name not in served:
        raise Refused(422, "unknown_model", f"model {name!r} is not served here; served models: {', '.join(served)}")
    return name


def admit(
    services: Services,
    tenant: str,
    data: bytes,
    image: UploadedImage,
    params: UpscaleParams,
    model: str,
    idempotency_key: str | None,
) -> tuple[JobRecord, bool]:
    """Check the work bounds, replay an Idempotency-Key's job, or store the input and submit the job
    (within the tenant's quota); (record, replayed). ``data``: the bytes the client sent."""
    settings = services.settings
    # The pipeline's canvas rule at SD2's sizes (512-px minimum side, 64-px multiple), so no admitted
    # job can exhaust a GPU; a model with a smaller native size (the tiny preset) runs on a smaller
    # canvas, so what the API admits any served model can run.
    try:
        check_work_bounds(
            (image.width, image.height),
            params.scale,
            SD2_SIZE_MULTIPLE,
            settings.max_output_pixels,
            settings.max_aspect_ratio,
        )
    except WorkBoundsError as exc:
        raise Refused(422, exc.code, f"{exc} (MEGASR_{exc.setting.upper()})") from None
    fingerprint = request_fingerprint(data, params)  # what the client sent: a retry matches it
    if idempotency_key is not None:
        replay = _replay(services, tenant, idempotency_key, fingerprint)
        if replay is not None:
            return replay, True
    if params.seed is None:  # drawn once and recorded: the job (and any retry of it) is reproducible
        params = params.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})
    params = params.model_copy(update={"model": model})  # the record says where it was routed
    quota = settings.max_queued_per_tenant
    if services.jobs.active_count(tenant) >= quota:  # cheap early answer; submit() enforces it atomically
        raise _quota_refusal(quota)
    job_id = uuid.uuid4().hex
    bind_log_context(job_id=job_id, tenant=tenant)
    record = JobRecord(
        id=job_id,
        tenant=tenant,
        params=params,
        model=model,
        input_key=input_key(job_id),
        input_content_type=image.content_type,
        input_width=image.width,
        input_height=image.height,
        trace_context=carrier(job_id=job_id, tenant=tenant),
    )
    services.storage.put(record.input_key, image.data, image.content_type)
    try:  # quota, record, idempotency key and RQ's enqueue: one transaction
        stored, created = lifecycle.submit(
            services.jobs,
            services.queue_for(model),
            record,
            idempotency_key,
            request_hash=fingerprint,
            max_active=quota,
        )
    except QuotaExceeded as exc:  # another request took the last slot since the check above
        services.storage.delete(record.input_key)
        raise _quota_refusal(exc.limit) from None
    except IdempotencyMismatch as exc:
        services.storage.delete(record.input_key)
        raise _mismatch_refusal(exc) from None
    if not created:  # lost a race with an identical request
        services.storage.delete(record.input_key)
    return stored, not created


def _replay(services: Services, tenant: str, idempotency_key: str, fingerprint: str) -> JobRecord | None:
    """The job this Idempotency-Key made for the same request; :class:`Refused` if it was another request."""
    found = services.jobs.find_idempotent_request(tenant, idempotency_key)
    if found is None:
        return None
    existing, stored_fingerprint = found
    if stored_fingerprint != fingerprint:
        raise _mismatch_refusal(
            IdempotencyMismatch(f"the Idempotency-Key was first used for a different request (job {existing.id})")
        )
    return existing


def _quota_refusal(quota: int) -> Refused:
    return Refused(
        429, "queue_quota", f"{quota} unfinished jobs already; wait for some to finish", {"Retry-After": "30"}
    )


def _mismatch_refusal(exc: IdempotencyMismatch) -> Refused:
    return Refused(
        422, "idempotency_mismatch", f"{exc}: an Idempotency-Key may only be retried with the same image and parameters"
    )
