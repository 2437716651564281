"""Errors the API answers with: ``{"error": {"code", "message"}}`` and the right status.

Infrastructure trouble is a 503 with ``Retry-After``, never a 500: Redis unreachable or refusing
writes (out of memory, a read-only replica after a failover, a failed RDB save), storage
unreachable or full. Anything else unexpected is a JSON 500 ``internal_error`` whose details go
only to the log.
"""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .storage import StorageFull, StorageUnavailable

log = logging.getLogger("megasr.api")
RETRY_AFTER = {"Retry-After": "5"}
#: a full store frees up slowly (results expire, someone adds space): clients back off longer
STORAGE_FULL_RETRY_AFTER = {"Retry-After": "30"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "form"))
        parts.append(f"{where or 'request'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def redis_refusal(exc: BaseException) -> tuple[str, str] | None:
    """(code, message) when Redis answered but refuses writes for now; None for any other error.

    redis-py maps OOM and READONLY replies (also from inside Lua scripts and transactions) to their
    own classes; a failed RDB save (``MISCONF``) has none, so its reply text is matched."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return "queue_full", "the job queue (Redis) is out of memory and refuses writes; retry later"
    if isinstance(exc, (redis.exceptions.ReadOnlyError, redis.exceptions.MasterDownError)):
        return "queue_read_only", "the job queue (Redis) is a read-only replica or fails over; retry later"
    if isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith("MISCONF"):
        return "queue_unavailable", "the job queue (Redis) cannot save to disk and refuses writes; retry later"
    return None


def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    route = getattr(request.scope.get("route"), "path", "unmatched")
    log.error(
        "unhandled %s on %s %s", type(exc).__name__, request.method, route, exc_info=(type(exc), exc, exc.__traceback__)
    )
    return JSONResponse(
        error_body("internal_error", "the server failed to answer this request; it is logged"), status_code=500
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("invalid_parameters", _validation_message(exc)), status_code=422)

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            error_body("queue_unavailable", "the job queue (Redis) is unreachable; retry later"),
            status_code=503,
            headers=RETRY_AFTER,
        )

    @app.exception_handler(redis.exceptions.ResponseError)
    async def _redis_refused(request: Request, exc: Exception) -> JSONResponse:
        refusal = redis_refusal(exc)
        if refusal is None:  # a bug of ours (a wrong command), not Redis's state
            return _internal_error(request, exc)
        log.warning("Redis refused a write: %s", exc)
        return JSONResponse(error_body(*refusal), status_code=503, headers=RETRY_AFTER)

    @app.exception_handler(StorageUnavailable)
    async def _storage_down(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            error_body("storage_unavailable", "object storage is unreachable; retry later"),
            status_code=503,
            headers=RETRY_AFTER,
        )

    @app.exception_handler(StorageFull)
    async def _storage_full(_: Request, exc: Exception) -> JSONResponse:
        log.warning("storage is full: %s", exc)
        return JSONResponse(
            error_body("storage_full", "object storage is full; retry later"),
            status_code=503,
            headers=STORAGE_FULL_RETRY_AFTER,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)  # Starlette's ServerErrorMiddleware: the last resort, never text/plain
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        return _internal_error(request, exc)
