"""Logging for ``megasr serve`` and ``megasr worker``: text or JSON lines, with job context, secrets redacted.

``configure_logging`` installs one stderr handler on the root logger (uvicorn's and RQ's loggers
propagate to it), formatted as text or as one JSON object per line (``MEGASR_LOG_FORMAT``). Each
record carries what is known of the work in progress: ``job_id``, ``tenant``, ``worker`` and
``stage`` from a context variable (``bind_log_context``; the API binds it per request, the worker
per job and batch) and the ``trace_id`` of the current OpenTelemetry span when tracing is on.

Nothing secret reaches the output: the configured API keys, webhook secret and metrics key are
replaced wherever they appear, passwords in URLs (``redis://:pw@host``) and bearer tokens are
masked, ``data:`` URLs and ``bytes`` arguments (image data) are reduced to their length. A secret is
masked however a URL encodes it (percent-encoded, wholly or in part, ``+`` for spaces), so a key
pasted into a query string does not reach the access log. asyncio's flood of accept errors at the
file-descriptor limit is thinned to one record per ``ACCEPT_ERROR_LOG_INTERVAL_S``.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal, ParamSpec, TypeVar

CONTEXT_FIELDS = ("job_id", "tenant", "worker", "stage", "trace_id")
MASK = "***"
#: at most one "socket.accept() out of system resource" record per this many seconds
ACCEPT_ERROR_LOG_INTERVAL_S = 10.0

_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "megasr_log_context", default=MappingProxyType({})
)
_handler: logging.Handler | None = None

P = ParamSpec("P")
R = TypeVar("R")


def _merged(fields: Mapping[str, object]) -> dict[str, str]:
    merged = {**_context.get(), **{k: str(v) for k, v in fields.items() if v is not None}}
    return {k: v for k, v in merged.items() if fields.get(k, v) is not None}


def bind_log_context(**fields: object) -> None:
    """Add fields (``job_id``, ``tenant``, ``worker``, ``stage``) to every record logged in this context;
    None removes one."""
    _context.set(_merged(fields))


@contextmanager
def log_fields(**fields: object) -> Iterator[None]:
    """``bind_log_context`` for the block only."""
    token = _context.set(_merged(fields))
    try:
        yield
    finally:
        _context.reset(token)


def log_context() -> Mapping[str, str]:
    return _context.get()


def fresh_log_context(function: Callable[P, R]) -> Callable[P, R]:
    """Run ``function`` in a copy of the current context, so what it binds ends with it (one job, one request)."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return contextvars.copy_context().run(function, *args, **kwargs)

    return wrapper


def _hex_byte(byte: int) -> str:
    """A regex for ``byte`` as two hex digits in either case."""
    return "".join(f"[{c.lower()}{c}]" if c.isalpha() else c for c in f"{byte:02X}")


def _any_encoding(secret: str) -> str:
    """A regex for ``secret`` as sent or logged in a URL: each character as itself or percent-encoded (any case,
    also double-encoded ``%2541``), a space also as ``+``, so partly encoded copies match too."""
    parts = []
    for char in secret:
        encoded = "".join(f"%(?:25)*{_hex_byte(b)}" for b in char.encode())
        parts.append(f"(?:{re.escape(char)}|{encoded}{'|[+]' if char == ' ' else ''})")
    return "".join(parts)


class Redactor:
    """Masks secrets (in any URL encoding) and image bytes in log text."""

    _URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s/]+(?P<at>@)")
    _BEARER = re.compile(r"(?i)\b(?P<head>bearer\s+|x-api-key[\"']?\s*[:=]\s*[\"']?)[^\s\"',;]+")
    _DATA_URL = re.compile(r"data:(?P<type>[\w/+.-]*)(?P<params>(?:;[\w=-]+)*),[A-Za-z0-9+/=%]+")

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)
        self._secrets = re.compile("|".join(map(_any_encoding, self.secrets))) if self.secrets else None

    def __call__(self, text: str) -> str:
        if self._secrets is not None:
            text = self._secrets.sub(MASK, text)
        text = self._URL_PASSWORD.sub(rf"\g<head>{MASK}\g<at>", text)
        text = self._BEARER.sub(rf"\g<head>{MASK}", text)
        return self._DATA_URL.sub(lambda m: f"data:{m['type']}{m['params']},<{len(m[0])} characters>", text)


def _scrub_argument(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    return value


class ContextFilter(logging.Filter):
    """Puts the context fields on each record and replaces ``bytes`` arguments by their length."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = dict(_context.get())
        from . import tracing  # no OpenTelemetry import: it answers None while tracing is off

        if (trace_id := tracing.current_trace_id()) is not None:
            fields["trace_id"] = trace_id
        record.megasr_context = fields
        if isinstance(record.args, Mapping):
            record.args = {k: _scrub_argument(v) for k, v in record.args.items()}
        elif record.args:
            record.args = tuple(_scrub_argument(a) for a in record.args)
        return True


class TextFormatter(logging.Formatter):
    """``time level logger: message [job_id=... tenant=...]``, redacted."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "megasr_context", None) or {}
        if fields:
            first_line, newline, rest = text.partition("\n")
            context = " ".join(f"{k}={fields[k]}" for k in CONTEXT_FIELDS if k in fields)
            text = f"{first_line} [{context}]{newline}{rest}"
        return self.redact(text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, the context fields, ``exc_info``."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": self.redact(record.getMessage()),
        }
        entry.update(getattr(record, "megasr_context", None) or {})
        if record.exc_info:
            entry["exc_info"] = self.redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exc_info"] = self.redact(record.exc_text)
        return json.dumps(entry, ensure_ascii=False, default=str)


class AcceptErrorThrottle(logging.Filter):
    """Lets one asyncio "socket.accept() out of system resource" record through per ``interval_s``.

    Out of file descriptors (EMFILE/ENFILE), asyncio logs that error with a traceback for every
    connection in the listen backlog and again on each retry: thousands of lines a second, which
    fill the disk and bury everything else while the server is already in trouble. The record that
    passes says how many were dropped since the last one."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s, self.clock = interval_s, clock
        self._last: float | None = None
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or not record.msg.startswith(self.MESSAGE):
            return True
        now = self.clock()
        if self._last is not None and now - self._last < self.interval_s:
            self._suppressed += 1
            return False
        if self._suppressed:
            first, newline, rest = record.msg.partition("\n")
            record.msg = (
                f"{first} ({self._suppressed} more since {now - self._last:.0f} s ago not logged; "
                f"the process is out of file descriptors){newline}{rest}"
            )
        self._last, self._suppressed = now, 0
        return True


def throttle_accept_errors(interval_s: float = ACCEPT_ERROR_LOG_INTERVAL_S) -> AcceptErrorThrottle:
    """Install (or replace) the :class:`AcceptErrorThrottle` of the ``asyncio`` logger."""
    asyncio_logger = logging.getLogger("asyncio")
    for old in [f for f in asyncio_logger.filters if isinstance(f, AcceptErrorThrottle)]:
        asyncio_logger.removeFilter(old)
    throttle = AcceptErrorThrottle(interval_s)
    asyncio_logger.addFilter(throttle)
    return throttle


def settings_secrets(settings: Any) -> list[str]:
    """The secret values of ``settings``: API keys, webhook secret, metrics key, passwords in the Redis URL."""
    from urllib.parse import urlsplit

    found: list[str] = []
    for name in ("webhook_secret", "metrics_key"):
        if (value := getattr(settings, name, None)) is not None:
            found.append(value.get_secret_value())
    try:
        found += list(settings.tenant_keys())
    except ValueError:
        pass  # the command reports the malformed keys itself
    for url in (getattr(settings, "redis_url", None),):
        if url and (password := urlsplit(url).password):
            found.append(password)
    return found


def configure_logging(
    fmt: Literal["text", "json"] = "text", *, level: int = logging.INFO, secrets: Iterable[str] = (), stream: Any = None
) -> logging.Handler:
    """Install (or replace) the one megasr handler on the root logger; uvicorn's loggers propagate to it."""
    global _handler
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, got {fmt!r}")
    redact = Redactor(secrets)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(redact) if fmt == "json" else TextFormatter(redact))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    throttle_accept_errors()
    _handler = handler
    return handler


def configure_from_settings(settings: Any) -> logging.Handler:
    """``configure_logging`` with ``settings.log_format`` and every secret of ``settings``."""
    return configure_logging(settings.log_format, secrets=settings_secrets(settings))
