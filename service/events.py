"""Server-Sent Events of one job: its progress while it runs, then its final state.

The stream polls the job's record in Redis (every :data:`POLL_INTERVAL_S`), so it works behind
any number of API replicas without pub/sub. Events:

- ``progress``: the job's view (JSON), whenever its status, progress or queue position changes
  (the first one at once);
- ``done``: the final view, after which the stream closes;
- ``error``: ``{"error": {"code", "message"}}`` if the job disappears (expired), then it closes.

A comment line (``: keep-alive``) goes out every :data:`KEEPALIVE_S` so that proxies keep the
connection open, and the stream ends after ``MEGASR_EVENTS_MAX_S`` in any case: clients
reconnect (``service.client`` does) or poll.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from .contracts import JobView
from .errors import error_body

POLL_INTERVAL_S = 0.5
KEEPALIVE_S = 15.0
MEDIA_TYPE = "text/event-stream"
#: headers of the stream: no caching, no proxy buffering (nginx)
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def format_event(event: str, data: object) -> str:
    """One SSE message (``data`` as a single line of JSON)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def job_events(
    load: Callable[[], Awaitable[JobView | None]], is_disconnected: Callable[[], Awaitable[bool]],
    max_seconds: float, poll_interval_s: float = POLL_INTERVAL_S, keepalive_s: float = KEEPALIVE_S,
) -> AsyncIterator[str]:
    """The events of one job; ``load()`` reads its current view (None once it is gone)."""
    deadline = time.monotonic() + max_seconds
    last_sent = time.monotonic()
    last_state: tuple | None = None
    while True:
        view = await load()
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
        await asyncio.sleep(min(poll_interval_s, max(0.0, deadline - now)))
