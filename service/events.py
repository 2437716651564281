"""Server-Sent Events of one job: its progress while it runs, then its final state.

The stream polls the job's record in Redis (every :data:`POLL_INTERVAL_S`), so it works behind
any number of API replicas without pub/sub. Events:

- ``progress``: the job's view (JSON), whenever its status, progress or queue position changes
  (the first one at once);
- ``done``: the final view, after which the stream closes;
- ``error``: ``{"error": {"code", "message"}}`` if the job disappears (expired), then it closes.

A comment line (``: keep-alive``) goes out every :data:`KEEPALIVE_S` so that proxies keep the
connection open, and the stream ends after ``MEGASR_EVENTS_MAX_S`` in any case: clients
reconnect (``megasr_client`` does) or poll.

The API reads jobs for its streams through one shared poller per process
(``service.event_poller``), and caps open streams per tenant and per process
(``service.stream_slots``); :class:`EventStreamResponse` gives a stream's slot back however the
stream ends.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import redis
from fastapi import FastAPI
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .config import Settings
from .contracts import JobView
from .errors import error_body
from .event_poller import FeedUnavailable, JobPoller
from .stream_slots import StreamSlots

POLL_INTERVAL_S = 0.5
KEEPALIVE_S = 15.0
MEDIA_TYPE = "text/event-stream"
#: headers of the stream: no caching, no proxy buffering (nginx)
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def format_event(event: str, data: object) -> str:
    """One SSE message (``data`` as a single line of JSON)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def job_events(
    load: Callable[[], Awaitable[JobView | None]],
    is_disconnected: Callable[[], Awaitable[bool]],
    max_seconds: float,
    poll_interval_s: float = POLL_INTERVAL_S,
    keepalive_s: float = KEEPALIVE_S,
    wait: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> AsyncIterator[str]:
    """The events of one job; ``load()`` reads its current view (None once it is gone; FeedUnavailable
    ends the stream quietly). ``wait(seconds)`` returns after that long, or earlier once the job
    changed; either way the client's presence is checked at least every ``poll_interval_s``."""
    deadline = time.monotonic() + max_seconds
    last_sent = time.monotonic()
    last_state: tuple | None = None
    while True:
        try:
            view = await load()
        except FeedUnavailable:
            return
        if view is None:
            yield format_event("error", error_body("job_not_found", "the job no longer exists (expired)"))
            return
        if view.status.is_final:
            yield format_event("done", view.model_dump(mode="json"))
            return
        state = (view.status, view.progress, view.queue_position, view.cancel_requested)
        now = time.monotonic()
        if state != last_state:
            last_state, last_sent = state, now
            yield format_event("progress", view.model_dump(mode="json"))
        elif now - last_sent >= keepalive_s:
            last_sent = now
            yield ": keep-alive\n\n"
        if now >= deadline or await is_disconnected():
            return
        await wait(min(poll_interval_s, max(0.0, deadline - now)))


class EventStreamResponse(StreamingResponse):
    """An event stream that calls ``on_close()`` once it is over, however it ends: done, deadline,
    client gone (Starlette cancels the body), an error, or a send that failed before the body began."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type=MEDIA_TYPE, headers=HEADERS)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


@dataclass
class EventStreams:
    """The process's shared job poller and its open-stream caps."""

    poller: JobPoller
    slots: StreamSlots


def event_streams(app: FastAPI, settings: Settings, client: redis.Redis) -> EventStreams:
    """The app's :class:`EventStreams`, made on first use (on the event loop, so without races)."""
    streams = getattr(app.state, "event_streams", None)
    if streams is None:
        streams = EventStreams(
            JobPoller(client, POLL_INTERVAL_S),
            StreamSlots(settings.max_event_streams_per_tenant, settings.max_event_streams),
        )
        app.state.event_streams = streams
    return streams
