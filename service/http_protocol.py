"""uvicorn's h11 protocol with the two guards it lacks: a request-head deadline and a connection cap.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``), but its timer stops at the
first byte: a client that sends half a header line and then one byte a minute holds a connection,
its file descriptor and its memory for ever, without any API key. :class:`GuardedH11Protocol`
gives every request head a deadline, counted from the connection's start or from the end of the
previous response, and closes the connection when the head is not complete by then.

Past ``max_connections`` open connections a new one is answered ``503`` (a JSON error) and closed
at once, before it can hold a file descriptor for a header timeout: the process keeps descriptors
for the clients it serves. (uvicorn's own ``limit_concurrency`` answers ``text/plain`` and only
once the request head has arrived.)

The body of a request has its own idle deadline where it is read (``service.body_limits``).
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("megasr.http")

_BUSY_BODY = json.dumps(
    {"error": {"code": "server_busy", "message": "the server has too many open connections; retry shortly"}}
).encode()
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class GuardedH11Protocol(H11Protocol):
    """``H11Protocol`` that closes connections whose request head is late, and refuses connections over the cap.

    Configure a subclass with :func:`guarded_protocol`; these class defaults match the settings' defaults."""

    header_timeout_s: float = 10.0
    max_connections: int = 1000

    _head_timer: asyncio.TimerHandle | None = None
    _waiting_after: object = None  # the cycle (None: no request yet) whose successor's head is awaited

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            logger.warning(
                "refused a connection: %d open, the limit is %d (MEGASR_MAX_CONNECTIONS)",
                len(self.connections) - 1,
                self.max_connections,
            )
            transport.write(BUSY_RESPONSE)
            transport.close()
            return
        self._await_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not self._waiting_after:  # a new request head was parsed
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        finished = self.cycle
        super().on_response_complete()
        if self.cycle is finished and not self.transport.is_closing():  # no pipelined request started
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._cancel_head_timer()
        self._waiting_after = self.cycle
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is self._waiting_after and not self.transport.is_closing():
            logger.debug(
                "closed a connection from %s: no complete request head within %g s (MEGASR_HEADER_TIMEOUT_S)",
                "{}:{}".format(*self.client) if self.client else "?",
                self.header_timeout_s,
            )
            self.transport.close()


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` with these limits, for ``uvicorn.Config(http=...)``."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout_s": header_timeout_s, "max_connections": max_connections},
    )
