"""Request bodies read against a byte limit, and JSON parsed against size and nesting limits.

``Content-Length`` is only a fast pre-check: a chunked body declares none, so the bytes of
``request.stream()`` are counted as they arrive and reading stops with a 413 at the limit. The
multipart parser reads from that counted stream, so nothing over the limit is ever buffered or
spooled to disk. JSON is checked for the size of its structure (everything outside strings) and
its nesting depth before :func:`json.loads` sees it, so hostile JSON is a 400, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncGenerator
from typing import Any

from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from .config import Settings
from .errors import ApiError

#: deepest JSON nesting accepted (the API's bodies are flat objects)
MAX_JSON_DEPTH = 32
#: most bytes of JSON outside string literals (keys, numbers, punctuation): the parameters are a handful
MAX_JSON_STRUCTURE_BYTES = 64 * 1024
#: largest multipart text field (the longest parameter is a 500-character prompt)
MAX_FORM_FIELD_BYTES = 16 * 1024

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


class BodyTooLarge(ApiError):
    """413: the request body is larger than ``limit`` bytes."""

    def __init__(self, limit: int, detail: str = "") -> None:
        super().__init__(413, "upload_too_large", f"the request body is over {limit:,} bytes{detail}")
        self.limit = limit


def check_declared_length(request: Request, limit: int, detail: str = "") -> None:
    """413 at once when ``Content-Length`` already says the body is over ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit, detail)


class BodyStalled(ApiError):
    """408: no byte of the request body arrived for ``timeout_s`` (a slow-body client holds a connection)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            408,
            "body_timeout",
            f"the request body stalled for {timeout_s:g} s; send it at a steady pace",
            headers={"Connection": "close"},
        )


def _idle_timeout_s(request: Request) -> float:
    """``MEGASR_BODY_IDLE_TIMEOUT_S`` of the app serving ``request`` (the settings' default outside an app)."""
    services = getattr(getattr(request.scope.get("app"), "state", None), "services", None)
    if services is None:
        return Settings.model_fields["body_idle_timeout_s"].default
    return services.settings.body_idle_timeout_s


async def _steady(request: Request, timeout_s: float) -> AsyncGenerator[bytes, None]:
    """``request.stream()``, raising :class:`BodyStalled` when the next chunk takes over ``timeout_s``."""
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), timeout_s)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise BodyStalled(timeout_s) from None
        yield chunk


async def limited_stream(request: Request, limit: int, detail: str = "") -> AsyncGenerator[bytes, None]:
    """The body's chunks, raising :class:`BodyTooLarge` as soon as more than ``limit`` bytes arrived and
    :class:`BodyStalled` when it stalls for ``MEGASR_BODY_IDLE_TIMEOUT_S``."""
    received = 0
    async for chunk in _steady(request, _idle_timeout_s(request)):
        received += len(chunk)
        if received > limit:
            raise BodyTooLarge(limit, detail)
        if chunk:
            yield chunk


async def read_limited(request: Request, limit: int, detail: str = "") -> bytes:
    """The whole body, at most ``limit`` bytes (chunked or not)."""
    check_declared_length(request, limit, detail)
    return b"".join([chunk async for chunk in limited_stream(request, limit, detail)])


async def parse_multipart(
    request: Request, limit: int, *, max_files: int, max_fields: int, detail: str = ""
) -> FormData:
    """The multipart form, parsed from the counted stream; 413 over ``limit``, 400 when malformed.

    The caller closes the returned form (its files)."""
    check_declared_length(request, limit, detail)
    parser = MultiPartParser(
        request.headers,
        limited_stream(request, limit, detail),
        max_files=max_files,
        max_fields=max_fields,
        max_part_size=MAX_FORM_FIELD_BYTES,
    )
    try:
        return await parser.parse()
    except ApiError:
        raise
    except MultiPartException as exc:
        raise ApiError(400, "invalid_multipart", f"cannot parse the multipart body: {exc.message}") from None
    except Exception as exc:  # e.g. a text field that is not valid in its charset
        raise ApiError(400, "invalid_multipart", f"cannot parse the multipart body ({type(exc).__name__})") from None


def _nesting(structure: bytes) -> int:
    """How deeply arrays and objects nest in JSON whose strings were emptied."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(structure):
        depth += 1 if match.group() in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_limited(
    body: bytes, max_depth: int = MAX_JSON_DEPTH, max_structure_bytes: int = MAX_JSON_STRUCTURE_BYTES
) -> Any:
    """Strict :func:`json.loads` (no NaN/Infinity) that answers 400 ``invalid_json`` for any bad body:
    malformed, too deeply nested, too much structure, or a number too long to convert."""
    structure = _JSON_STRING.sub(b'""', body)  # brackets inside strings do not nest
    if len(structure) > max_structure_bytes:
        raise ApiError(400, "invalid_json", f"the JSON has over {max_structure_bytes:,} bytes outside strings")
    depth = _nesting(structure)
    if depth > max_depth:
        raise ApiError(400, "invalid_json", f"the JSON nests {depth} levels deep; the limit is {max_depth}")
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except RecursionError:  # only reachable for malformed JSON the scan above miscounts
        raise ApiError(400, "invalid_json", "the JSON nests too deeply") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON ({exc})") from None
    except ValueError as exc:  # an integer over Python's digit limit, NaN/Infinity, a bad encoding
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {str(exc).split(':')[0]}") from None
