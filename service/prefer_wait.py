"""``Prefer: wait=N`` on ``POST /v1/upscale``: answer with the finished job when it finishes within
N seconds (RFC 7240's ``wait`` preference, as Replicate's API takes it), else the usual 202.

The wait follows the job through the process's shared job poller, as an event stream does, and
holds one of the tenant's event-stream slots while it waits: waiting requests cost one pipelined
Redis read per tick for all of them, and one tenant cannot hold every connection. Without a free
slot, or when Redis cannot be read, the answer is the 202 at once, as if nothing was preferred.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .errors import ApiError
from .event_poller import FeedUnavailable
from .events import EventStreams

#: the longest wait honoured, in seconds (a ``wait`` without a number waits this long)
MAX_WAIT_S = 60
T = TypeVar("T")
_WAIT = re.compile(r"^\s*wait\s*(?:=\s*\"?(?P<seconds>\d{1,6})\"?)?\s*$", re.IGNORECASE)


def preferred_wait(headers: list[str]) -> int | None:
    """Seconds of the first ``wait`` preference among the ``Prefer`` headers, bounded by
    :data:`MAX_WAIT_S`; None when there is none or it is not a whole number (RFC 7240: a
    preference a server does not understand is ignored)."""
    for header in headers:
        for preference in header.split(","):
            name = preference.split(";", 1)[0]
            if not name.strip().lower().startswith("wait"):
                continue
            found = _WAIT.match(name)
            if found is None:
                return None
            seconds = found.group("seconds")
            return MAX_WAIT_S if seconds is None else min(int(seconds), MAX_WAIT_S)
    return None


async def wait_until_final(
    streams: EventStreams,
    tenant: str,
    job_id: str,
    queue_key: str,
    seconds: float,
    view: Callable[[object], T | None],
    is_disconnected: Callable[[], Awaitable[bool]],
) -> T | None:
    """``view(snapshot)`` of the job once it is final, or None after ``seconds`` (or without a slot,
    a readable Redis or the client). ``view`` returns None while the job is not final."""
    try:
        slot = streams.slots.acquire(tenant)
    except ApiError:  # the tenant's streams are all open: no waiting, the usual 202
        return None
    follow = streams.poller.follow(job_id, queue_key)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        while True:
            snapshot = await follow.latest()
            found = view(snapshot)
            if found is not None:
                return found
            remaining = deadline - loop.time()
            if remaining <= 0 or await is_disconnected():
                return None
            await follow.wait_change(min(remaining, 1.0))
    except FeedUnavailable:
        return None
    finally:
        follow.close()
        slot.release()
