"""A loopback HTTP server that records webhook deliveries, and can misbehave on purpose."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple


class Delivery(NamedTuple):
    at: float  # time.time() when the request arrived
    status: int  # what the receiver answered
    headers: dict[str, str]
    body: bytes


class WebhookReceiver:
    """A real HTTP server on 127.0.0.1 that records every POST; ``respond(n)`` is the status of the n-th,
    sent with ``headers`` (e.g. a ``Location`` for a redirect).

    Misbehaving receivers, for the delivery limits: ``body_bytes`` answers with a body that long (sent until
    the client hangs up); ``drip_s`` sends the answer (status line, headers, body) one byte every ``drip_s``
    seconds for ``drip_for_s`` seconds, then the rest; ``tls`` serves HTTPS with that server context."""

    def __init__(
        self,
        respond: Callable[[int], int],
        headers: dict[str, str] | None = None,
        *,
        body_bytes: int = 0,
        drip_s: float | None = None,
        drip_for_s: float = 30.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.calls: list[Delivery] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = respond(len(receiver.calls))
                receiver.calls.append(Delivery(time.time(), status, dict(self.headers), body))
                if body_bytes or drip_s is not None:
                    self.misbehave(status)
                    return
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def misbehave(self, status: int) -> None:
                self.close_connection = True
                fields = {**(headers or {}), "Content-Length": str(body_bytes), "Connection": "close"}
                answer = (
                    f"HTTP/1.1 {status} Whatever\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
                ).encode()
                try:
                    if drip_s is not None:
                        answer += b"x" * body_bytes
                        until = time.monotonic() + drip_for_s
                        while answer and time.monotonic() < until:
                            self.wfile.write(answer[:1])
                            answer = answer[1:]
                            time.sleep(drip_s)
                        self.wfile.write(answer)
                        return
                    self.wfile.write(answer)
                    chunk, left = b"x" * 65536, body_bytes
                    while left > 0:
                        self.wfile.write(chunk[:left])
                        left -= len(chunk)
                except OSError:  # the client hung up: what a deadline or a size cap should make it do
                    return

            def log_message(self, *args) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
