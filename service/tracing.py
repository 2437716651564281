"""Optional OpenTelemetry traces: API request → enqueue → the worker's stages, one trace per job.

Off unless ``MEGASR_OTLP_ENDPOINT`` is set (or a test hands ``configure_tracing`` its own tracer
provider); while off, every helper here is a cheap no-op and OpenTelemetry is never imported (the
packages are the ``[otel]`` extra). The trace crosses the queue in the job record: the API puts a
W3C ``traceparent`` carrier into ``JobRecord.trace_context`` inside its ``enqueue`` span, and the
worker continues it. The worker's stage spans (``stage.extractors``, ``stage.denoise``, …) are
recorded from the pipeline's own ``result.timings``, laid end to end from the start of the
pipeline call (a stage that ran once per sub-batch shows its total), and ``store`` wraps the
upload of each result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

#: the tracer while tracing is on, else None
_tracer: Any = None
#: timings that are not stages of their own
_NOT_STAGES = frozenset({"total", "denoise_step_median"})


def configure_tracing(endpoint: str | None, service_name: str = "megasr", provider: Any = None) -> bool:
    """Turn tracing on (an OTLP/HTTP exporter to ``endpoint``, or the given ``provider``) or off; True when on."""
    global _tracer
    if provider is None and not endpoint:
        _tracer = None
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise RuntimeError("MEGASR_OTLP_ENDPOINT needs the [otel] extra: pip install 'megasr[otel]'") from None
    if provider is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        trace.set_tracer_provider(provider)  # for libraries that trace through the global provider
    _tracer = provider.get_tracer("megasr")
    return True


def enabled() -> bool:
    return _tracer is not None


def current_trace_id() -> str | None:
    """The current span's trace id (32 hex digits), or None while tracing is off or outside any span."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


@contextmanager
def span(
    name: str, parent: Mapping[str, str] | None = None, start_ns: int | None = None, **attributes: Any
) -> Iterator[Any]:
    """A span around the block (a child of ``parent``, a W3C carrier, when given); None while off."""
    if _tracer is None:
        yield None
        return
    from opentelemetry.propagate import extract

    context = extract(dict(parent)) if parent else None
    with _tracer.start_as_current_span(
        name, context=context, start_time=start_ns, attributes=_attributes(attributes)
    ) as current:
        yield current


def traced(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: run the function inside a span called ``name``."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with span(name) if _tracer is not None else nullcontext():
                return function(*args, **kwargs)

        return wrapper

    return decorate


def carrier(**attributes: Any) -> dict[str, str] | None:
    """The current span as a W3C carrier (``traceparent``) for the job record; the attributes go on the span."""
    if _tracer is None:
        return None
    from opentelemetry import trace
    from opentelemetry.propagate import inject

    trace.get_current_span().set_attributes(_attributes(attributes))
    found: dict[str, str] = {}
    inject(found)
    return found or None


def record_stages(timings: Mapping[str, float], start_ns: int, **attributes: Any) -> None:
    """Child spans ``stage.<name>`` of the current span from the pipeline's timings (seconds), end to end."""
    if _tracer is None:
        return
    at = start_ns
    for name, seconds in timings.items():
        if name in _NOT_STAGES or not isinstance(seconds, (int, float)):
            continue
        end = at + int(seconds * 1e9)
        _tracer.start_span(f"stage.{name}", start_time=at, attributes=_attributes(attributes)).end(end_time=end)
        at = end


def _attributes(values: Mapping[str, Any]) -> dict[str, Any]:
    return {f"megasr.{k}": v for k, v in values.items() if isinstance(v, (str, bool, int, float))}


class TracingMiddleware:
    """ASGI middleware: a server span per HTTP request, continuing the caller's ``traceparent``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or _tracer is None:
            await self.app(scope, receive, send)
            return
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind, Status, StatusCode

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        status: list[int] = []

        async def send_with_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        method = scope.get("method", "GET")
        with _tracer.start_as_current_span(
            method, context=extract(headers), kind=SpanKind.SERVER, attributes={"http.request.method": method}
        ) as current:
            try:
                await self.app(scope, receive, send_with_status)
            finally:
                route = getattr(scope.get("route"), "path", None)  # the template, e.g. /v1/jobs/{job_id}
                current.update_name(f"{method} {route}" if route else method)
                if route:
                    current.set_attribute("http.route", route)
                if status:
                    current.set_attribute("http.response.status_code", status[0])
                    if status[0] >= 500:
                        current.set_status(Status(StatusCode.ERROR))
