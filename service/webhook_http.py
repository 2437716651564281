"""One webhook POST: to a pinned address, under one wall-clock deadline, reading a bounded answer.

httpx's timeouts are per operation (each read may take the whole read timeout again), so a
receiver that drips a byte at a time could hold a delivery forever. Here the request runs on
httpcore (httpx's own HTTP engine) with a network backend that

* connects only to the addresses the dispatcher resolved and checked (DNS pinning), while the
  request keeps the URL's host for the ``Host`` header, TLS SNI and certificate check; and
* gives every connect, TLS handshake, write and read only the time left until the deadline, so
  connect + send + response headers + body together never take longer than ``timeout_s``.

At most :data:`RESPONSE_LIMIT` bytes of the response body are read; the rest is dropped with the
connection. Nothing is pooled between deliveries: each one opens (and closes) its own connection.
"""

from __future__ import annotations

import ssl
import time
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import httpcore

RESPONSE_LIMIT = 64 * 1024  # bytes of a receiver's answer that are read at most
HTTP_ERRORS: tuple[type[Exception], ...] = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
)
"""What :func:`post` raises for a failed delivery (a timeout is a ``TimeoutException``)."""


@dataclass(frozen=True)
class WebhookResponse:
    status: int
    body: bytes  # the first RESPONSE_LIMIT bytes at most


class _Deadline:
    def __init__(self, at: float) -> None:
        self.at = at

    def budget(self, timeout: float | None, error: type[Exception]) -> float:
        """The time an operation may take: its own timeout, cut to what is left of the deadline."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise error("webhook delivery deadline exceeded")
        return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connected stream whose every operation ends by the deadline."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: _Deadline) -> None:
        self._inner, self._deadline = inner, deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._deadline.budget(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        step = 16 * 1024  # the inner write restarts its timeout per send(): keep each send small
        for start in range(0, len(buffer), step):
            self._inner.write(buffer[start : start + step], self._deadline.budget(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        budget = self._deadline.budget(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, budget), self._deadline)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects to the checked addresses (in order, the next one when one refuses), never to
    whatever the URL's host would resolve to now."""

    def __init__(self, addresses: Sequence[str], deadline: _Deadline) -> None:
        self._addresses, self._deadline = list(addresses), deadline
        self._sync = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[typing.Any] | None = None,
    ) -> httpcore.NetworkStream:
        error: Exception = httpcore.ConnectError("no address to connect to")
        for address in self._addresses:
            budget = self._deadline.budget(timeout, httpcore.ConnectTimeout)
            try:
                stream = self._sync.connect_tcp(address, port, budget, local_address, socket_options)
            except httpcore.ConnectError as exc:
                error = exc
                continue
            return _DeadlineStream(stream, self._deadline)
        raise error

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[typing.Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.UnsupportedProtocol("webhooks are delivered over TCP only")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def post(
    url: str,
    addresses: Sequence[str],
    headers: dict[str, str],
    body: bytes,
    *,
    timeout_s: float,
    ssl_context: ssl.SSLContext,
    response_limit: int = RESPONSE_LIMIT,
) -> WebhookResponse:
    """POST ``body`` to ``url`` through one of ``addresses``, all within ``timeout_s`` seconds.

    ``headers`` must carry ``Host`` (the URL's authority). Redirects are not followed (a 3xx is
    returned like any other status). Raises one of :data:`HTTP_ERRORS`."""
    deadline = _Deadline(time.monotonic() + timeout_s)
    timeouts = {"connect": timeout_s, "read": timeout_s, "write": timeout_s, "pool": timeout_s}
    backend = _PinnedBackend(addresses, deadline)
    with httpcore.ConnectionPool(ssl_context=ssl_context, network_backend=backend, max_connections=1) as pool:
        with pool.stream("POST", url, headers=headers, content=body, extensions={"timeout": timeouts}) as response:
            kept = bytearray()
            for chunk in response.iter_stream():
                kept += chunk[: response_limit - len(kept)]
                if len(kept) >= response_limit:
                    break  # leaving the block closes the connection, unread bytes and all
            return WebhookResponse(response.status, bytes(kept))
