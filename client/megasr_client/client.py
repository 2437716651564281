"""A Python client of the MegaSR API (httpx): submit, follow, download, cancel, list; retries.

    from megasr_client import MegaSRClient

    with MegaSRClient("http://127.0.0.1:8000", api_key="...") as client:
        print([m.name for m in client.models()])  # GET /v1/models: the default first
        job = client.submit("photo.png", scale=4, steps=30)  # model="..." picks another served model
        job = client.wait(job.id, on_progress=lambda j: print(f"{j.status.value} {j.progress:.0%}"))
        client.download(job.id, "photo-x4.png")

Every error answer of the API raises :class:`MegaSRError` (or a subclass per status) carrying its
``status``, ``code`` and ``message``. :meth:`MegaSRClient.wait` follows the job's Server-Sent Events
and falls back to polling when the stream is unavailable. Requests that are safe to repeat are
retried on 429, 503 and broken connections (``max_retries``, after ``Retry-After``); a submission
is one of them, since it carries an ``Idempotency-Key`` (one is made when none is given).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from .models import Job, JobPage, JobStatus, Model, parse_models

ProgressCallback = Callable[[Job], None]
#: statuses after which the same request may succeed: rate limits, queue quota, a service restarting
RETRY_STATUSES = frozenset({429, 503})


class MegaSRError(Exception):
    """An error answer of the API: HTTP ``status`` and the body's ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


class AuthenticationError(MegaSRError):
    """401: missing or invalid API key."""


class NotFoundError(MegaSRError):
    """404: no such job for this API key's tenant."""


class ConflictError(MegaSRError):
    """409: not possible in the job's current state (e.g. its result before it succeeded)."""


class InvalidRequestError(MegaSRError):
    """400, 413, 415, 422: the request itself is wrong; retrying it will not help."""


class RateLimitedError(MegaSRError):
    """429: too many requests or unfinished jobs; ``retry_after`` seconds."""


class ServiceUnavailableError(MegaSRError):
    """503: Redis or storage is unreachable; retry later."""


class JobFailedError(MegaSRError):
    """:meth:`MegaSRClient.wait` with ``raise_on_failure``: the job failed or was canceled."""

    def __init__(self, job: Job) -> None:
        error = job.error
        super().__init__(
            200,
            error.code if error else job.status.value,
            error.message if error else f"job {job.id} was {job.status.value}",
        )
        self.job = job


_ERRORS: dict[int, type[MegaSRError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: InvalidRequestError,
    415: InvalidRequestError,
    422: InvalidRequestError,
    429: RateLimitedError,
    503: ServiceUnavailableError,
}


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        response.read()
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:500] or response.reason_phrase
    retry_after = response.headers.get("retry-after")
    cls = _ERRORS.get(response.status_code, MegaSRError)
    raise cls(response.status_code, code, message, float(retry_after) if retry_after else None)


def _sse_messages(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) of each Server-Sent Events message; a comment (keep-alive) is ("", "")."""
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            yield "", ""
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)


class MegaSRClient:
    """Synchronous client of one API. ``transport`` (an httpx transport) or ``http`` (an
    ``httpx.Client`` with its base URL, such as starlette's ``TestClient``) route its requests
    elsewhere, e.g. to an app in the same process."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        http: httpx.Client | None = None,
        poll_interval_s: float = 1.0,
        max_retries: int = 3,
        max_retry_wait_s: float = 30.0,
    ) -> None:
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout, transport=transport)
        if api_key:
            self.http.headers["Authorization"] = f"Bearer {api_key}"
        self.poll_interval_s = poll_interval_s
        #: retries of a repeatable request after 429, 503 or a broken connection (0: none)
        self.max_retries = max_retries
        #: the longest pause before a retry, whatever ``Retry-After`` asks
        self.max_retry_wait_s = max_retry_wait_s

    def __enter__(self) -> MegaSRClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """The answer to one request, retried while it may yet succeed (see the module docstring)."""
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                response = self.http.request(method, url, **kwargs)
            except httpx.TransportError:
                if last:
                    raise
                self._pause(attempt, None)
                continue
            if response.status_code in RETRY_STATUSES and not last:
                self._pause(attempt, response.headers.get("retry-after"))
                continue
            _raise_for_error(response)
            return response
        raise AssertionError("unreachable")

    def _pause(self, attempt: int, retry_after: str | None) -> None:
        """Before retry ``attempt + 1``: ``Retry-After`` seconds, else 0.5, 1, 2, ... (both capped)."""
        try:
            seconds = float(retry_after) if retry_after is not None else 0.5 * 2**attempt
        except ValueError:  # an HTTP date: rare from this API; back off as without one
            seconds = 0.5 * 2**attempt
        time.sleep(min(max(seconds, 0.0), self.max_retry_wait_s))

    # ------------------------------------------------------------------ models
    def models(self) -> list[Model]:
        """The models this API serves, the default first (``GET /v1/models``): family, weights,
        whether trained, default steps and guidance, workers serving it now."""
        return parse_models(self._request("GET", "/v1/models").json())

    # ------------------------------------------------------------------ jobs
    def submit(
        self,
        image: str | os.PathLike | bytes,
        *,
        model: str | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> Job:
        """Queue an image (a path or its bytes) for ``model`` (None: the default one, see
        :meth:`models`) with the API's parameters (scale, steps, seed, prompt, ...). A retry
        after a lost answer returns the same job: the request carries an Idempotency-Key."""
        params["model"] = model
        if isinstance(image, bytes):
            name, data = "image", image
        else:
            name, data = Path(image).name, Path(image).read_bytes()
        # a form carries text: a pair such as cfg_interval=(0, 0.6) goes as "0,0.6"
        fields = {
            k: ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
            for k, v in params.items()
            if v is not None
        }
        headers = {"Idempotency-Key": idempotency_key or f"megasr-client-{uuid.uuid4().hex}"}
        response = self._request("POST", "/v1/upscale", files={"image": (name, data)}, data=fields, headers=headers)
        return Job.model_validate(response.json())

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self._request("GET", f"/v1/jobs/{job_id}").json())

    def list_jobs(
        self,
        *,
        status: JobStatus | str | list[JobStatus | str] | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> JobPage:
        """One page of this tenant's jobs, newest first; pass ``next`` back as ``cursor``."""
        statuses = [status] if isinstance(status, (str, JobStatus)) else list(status or [])
        params: dict[str, Any] = {"limit": limit, "status": [JobStatus(s).value for s in statuses]}
        if cursor is not None:
            params["cursor"] = cursor
        return JobPage.model_validate(self._request("GET", "/v1/jobs", params=params).json())

    def iter_jobs(self, **filters: Any) -> Iterator[Job]:
        """Every job of this tenant, newest first, page after page."""
        cursor = None
        while True:
            page = self.list_jobs(cursor=cursor, **filters)
            yield from page.jobs
            if page.next is None:
                return
            cursor = page.next

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once, a running one within a denoising step (the job as it is now)."""
        return Job.model_validate(self._request("DELETE", f"/v1/jobs/{job_id}").json())

    def events(self, job_id: str) -> Iterator[Job]:
        """The job's Server-Sent Events, as jobs (the last one final unless the stream was cut)."""
        return (job for job in self._event_stream(job_id) if job is not None)

    def _event_stream(self, job_id: str, read_timeout: float = 60.0) -> Iterator[Job | None]:
        """The job at each event, None at each keep-alive (the server sends one every 15 s)."""
        # A plain (connect, read, write, pool) tuple: ``http`` may be a client of httpx or of a fork
        # (starlette's TestClient is built on httpx2, which refuses httpx's Timeout objects).
        default = self.http.timeout
        timeout = (default.connect, read_timeout, default.write, default.pool)
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as response:
            _raise_for_error(response)
            for event, data in _sse_messages(response.iter_lines()):
                if event in ("progress", "done"):
                    yield Job.model_validate_json(data)
                elif event == "":
                    yield None
                elif event == "error":
                    error = json.loads(data)["error"]
                    raise NotFoundError(404, error["code"], error["message"])

    def wait(
        self,
        job_id: str,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        raise_on_failure: bool = False,
    ) -> Job:
        """Block until the job is final; ``on_progress(job)`` on each change. Follows the event
        stream (reconnecting when it ends early), polling instead if it cannot be opened.
        ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job: Job | None = None
        use_stream = True
        while True:
            if use_stream:
                # Reads end at the deadline (the stream may stay quiet for up to 15 s between keep-alives).
                read_timeout = 60.0 if deadline is None else min(60.0, max(0.05, deadline - time.monotonic()))
                try:
                    for event in self._event_stream(job_id, read_timeout):
                        if event is not None:
                            job = event
                            if on_progress is not None:
                                on_progress(job)
                        if deadline is not None and time.monotonic() >= deadline:
                            break
                except httpx.ReadTimeout:
                    if deadline is None or time.monotonic() < deadline:
                        use_stream = False  # silent for a minute: a proxy holding the stream back
                except (httpx.TransportError, ServiceUnavailableError):
                    use_stream = False  # a proxy that drops long requests, a restart: poll instead
                except RateLimitedError as exc:
                    if exc.code != "too_many_streams":
                        raise
                    use_stream = False  # this key's streams are all taken: polling needs none
            else:
                fresh = self.get(job_id)
                if on_progress is not None and fresh != job:
                    on_progress(fresh)
                job = fresh
            if job is not None and job.status.is_final:
                if raise_on_failure and job.status != JobStatus.succeeded:
                    raise JobFailedError(job)
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is not finished after {timeout} s")
            if not use_stream:
                time.sleep(
                    self.poll_interval_s
                    if deadline is None
                    else max(0.0, min(self.poll_interval_s, deadline - time.monotonic()))
                )

    def upscale(
        self,
        image: str | os.PathLike | bytes,
        output: str | os.PathLike,
        *,
        model: str | None = None,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        **params: Any,
    ) -> Job:
        """Submit, wait and download in one call: the finished job (``model_info`` says which model
        ran it); :class:`JobFailedError` if it failed or was canceled."""
        job = self.submit(image, model=model, **params)
        job = self.wait(job.id, on_progress=on_progress, timeout=timeout, raise_on_failure=True)
        self.download(job.id, output)
        return job

    def download(self, job_id: str, path: str | os.PathLike) -> Path:
        """Write the result image to ``path`` (following a presigned-URL redirect); the path."""
        target = Path(path)
        with self.http.stream("GET", f"/v1/jobs/{job_id}/result", follow_redirects=True) as response:
            _raise_for_error(response)
            partial = target.with_name(target.name + ".part")
            with partial.open("wb") as file:
                for chunk in response.iter_bytes():
                    file.write(chunk)
            partial.replace(target)
        return target
