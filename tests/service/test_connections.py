"""Slow and numerous connections against a real uvicorn with the API's server options, over raw sockets:
half-sent heads and stalled bodies are cut off, connections past the cap get a JSON 503, asyncio's
accept-error flood at the file-descriptor limit is thinned, and keys are masked in the access log."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest
import uvicorn

from service.app import create_app
from service.logging_setup import AcceptErrorThrottle, configure_logging
from service.server_options import uvicorn_options
from tests.harness.ports import free_port
from tests.service.helpers import make_settings

#: the tests' deadlines: short, so the suite stays fast, and far from the 5 s a broken guard would hang for
TIMEOUT_S = 0.5
HANG_S = 5.0


@contextmanager
def guarded_server(tmp_path, redis_url, log_level: str = "warning", **changes) -> Iterator[int]:
    """The API app on a loopback port, served with ``uvicorn_options`` of its settings: the port."""
    settings = make_settings(tmp_path, redis_url, header_timeout_s=TIMEOUT_S, body_idle_timeout_s=TIMEOUT_S, **changes)
    port = free_port()
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        log_level=log_level,
        lifespan="on",
        **uvicorn_options(settings),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-guarded-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=HANG_S)
    return sock


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started, chunks = time.monotonic(), []
    while chunk := sock.recv(65536):  # socket.timeout (a test failure) when the server never closes
        chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - started


def get(sock: socket.socket, path: str = "/healthz") -> bytes:
    """One keep-alive GET on ``sock``: the response head and body (the server answers JSON with a length)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_half_sent_and_trickled_heads_are_closed_after_the_header_timeout(tmp_path, db_url):
    with guarded_server(tmp_path, db_url) as port:
        half = connect(port)
        half.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        trickle, started = connect(port), time.monotonic()
        try:  # a byte every 0.1 s is no progress: the server hangs up (a broken pipe here) at the deadline
            for byte in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " * 2:
                trickle.sendall(bytes([byte]))
                time.sleep(0.1)
        except OSError:
            pass
        assert read_until_closed(trickle)[0] == b"" and time.monotonic() - started < TIMEOUT_S + 1.5
        data, waited = read_until_closed(half)
        assert data == b"" and waited < 0.5
        # after a response the next head has the same deadline (uvicorn's keep-alive timer stops at its first byte)
        kept = connect(port)
        assert get(kept).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /healthz HTTP/1.1\r\n")
        data, waited = read_until_closed(kept)
        assert data == b"" and waited < TIMEOUT_S + 1.5


def test_a_prompt_client_keeps_its_connection_for_several_requests(tmp_path, db_url):
    with guarded_server(tmp_path, db_url) as port:
        sock = connect(port)
        for _ in range(3):
            time.sleep(TIMEOUT_S / 3)
            assert get(sock).startswith(b"HTTP/1.1 200")


def test_a_stalled_body_ends_with_a_json_408(tmp_path, db_url):
    with guarded_server(tmp_path, db_url) as port:
        sock = connect(port)
        sock.sendall(
            b"POST /v1/upscale HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"image": "'
        )
        data, waited = read_until_closed(sock)
        assert waited < TIMEOUT_S + 1.5
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
        assert json.loads(body)["error"]["code"] == "body_timeout"


def test_connections_past_the_cap_get_a_json_503_and_are_closed(tmp_path, db_url):
    with guarded_server(tmp_path, db_url, max_connections=2) as port:
        first, second = connect(port), connect(port)
        time.sleep(0.1)  # both accepted
        data, waited = read_until_closed(connect(port))
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and waited < 1
        assert json.loads(body)["error"]["code"] == "server_busy"
        assert get(first).startswith(b"HTTP/1.1 200")  # the connections within the cap are served
        second.close()
        time.sleep(0.1)
        assert get(connect(port)).startswith(b"HTTP/1.1 200")  # a freed slot is taken again


def test_keys_are_masked_in_the_access_log_in_any_url_encoding(tmp_path, db_url):
    key = "k3y-of-acme.0123456789"
    captured = io.StringIO()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    configure_logging("text", secrets=[key], stream=captured)
    try:
        with guarded_server(tmp_path, db_url, log_level="info", api_keys=f"acme:{key}", allow_anonymous=False) as port:
            sent = [
                key,
                quote(key, safe=""),
                "".join(f"%{b:02x}" for b in key.encode()),  # raw, %-encoded, all of it
                key[:3] + "%2D" + key[4:],
                key.replace(".", "%252E"),
            ]  # partly, and twice encoded
            sock = connect(port)
            for index, variant in enumerate(sent):
                assert get(sock, f"/v1/jobs?api_key={variant}&n={index}").startswith(b"HTTP/1.1 401")
            assert get(sock, f"/v1/jobs/{quote(key, safe='')}").startswith(b"HTTP/1.1 401")
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    text = captured.getvalue()
    lines = [line for line in text.splitlines() if "/v1/jobs" in line]
    assert len(lines) == len(sent) + 1, text  # every request reached the access log
    for variant in {*sent, key[4:]}:
        assert variant not in text
    assert text.count("api_key=***&") == len(sent) and "/v1/jobs/***" in text


def test_the_accept_error_throttle_passes_one_record_per_interval_with_a_count(captured):
    now = [100.0]
    throttle = AcceptErrorThrottle(interval_s=10, clock=lambda: now[0])
    log = logging.getLogger("tests.accept_error_throttle")  # a logger of its own, not the root's handlers
    log.propagate = False
    handler = logging.StreamHandler(captured)
    log.addFilter(throttle)
    log.addHandler(handler)
    try:
        for step in range(50):  # five seconds of a flood, 10 a second
            try:
                raise OSError(24, "Too many open files")
            except OSError as exc:
                log.error("socket.accept() out of system resource\nsocket: <socket>", exc_info=exc)
            log.error("Task exception was never retrieved")  # other asyncio errors pass untouched
            now[0] += 0.1 if step < 49 else 10
        log.error("socket.accept() out of system resource\nsocket: <socket>")
    finally:
        log.removeFilter(throttle)
        log.removeHandler(handler)
    text = captured.getvalue()
    assert text.count("socket.accept() out of system resource") == 2 and text.count("OSError: [Errno 24]") == 1
    assert text.count("Task exception was never retrieved") == 50
    assert "(49 more since 15 s ago not logged; the process is out of file descriptors)" in text


SERVER_AT_FD_LIMIT = textwrap.dedent("""
    import resource, sys
    import uvicorn
    from service.logging_setup import configure_logging

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    configure_logging("text")
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_config=None, log_level="info",
                timeout_keep_alive=60)
""")


def test_a_server_out_of_file_descriptors_logs_the_accept_error_once(tmp_path):
    """A real uvicorn at RLIMIT_NOFILE=64 with 150 connections waiting: asyncio would log a traceback per
    connection in the backlog and per retry; configure_logging's throttle lets one through."""
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER_AT_FD_LIMIT, str(port)], stdout=log, stderr=subprocess.STDOUT
        )
    clients: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=1))
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        for _ in range(150):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(2.5)  # a couple of accept retries (asyncio retries after 1 s)
        assert server.poll() is None, log_path.read_text()
    finally:
        for client in clients:
            client.close()
        server.terminate()
        server.wait(timeout=30)
    text = log_path.read_text()
    assert text.count("socket.accept() out of system resource") == 1, text[:3000]
    assert "Too many open files" in text


@pytest.mark.parametrize(
    "command", [["megasr", "serve"], ["python", "-m", "service.api_server"]], ids=["megasr-serve", "api-image-command"]
)
def test_every_launch_path_applies_the_header_timeout(tmp_path, db_url, command):
    """`megasr serve` and the API image's command (which Compose and Kubernetes run) read the same settings."""
    port = free_port()
    executable = str(Path(sys.executable).with_name(command[0])) if command[0] == "megasr" else sys.executable
    env = {
        **os.environ,
        "MEGASR_HOME": str(tmp_path / "home"),
        "MEGASR_REDIS_URL": db_url,
        "MEGASR_STORAGE_URL": (tmp_path / "data").as_uri(),
        "MEGASR_API_KEYS": "acme:acme-key-0123456789",
        "MEGASR_HEADER_TIMEOUT_S": str(TIMEOUT_S),
    }
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [executable, *command[1:], "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=HANG_S)
                break
            except OSError:
                time.sleep(0.2)
        assert get(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        data, waited = read_until_closed(sock)
        assert data == b"" and waited < TIMEOUT_S + 1.5
    finally:
        server.terminate()
        server.wait(timeout=30)
