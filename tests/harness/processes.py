"""`megasr serve` and `megasr worker` as real processes on free ports, started and waited for until ready."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx

from tests.harness.ports import free_port


def start_serve(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """`megasr serve` on a free port with ``env``, once its /readyz answers 200: (process, base URL)."""
    port = free_port()
    with log_path.open("wb") as log:  # the child keeps its own handle
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("megasr")), "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if server.poll() is not None:
            raise AssertionError(log_path.read_text()[-2000:])
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return server, base
        except httpx.HTTPError:
            pass
        if time.monotonic() >= deadline:
            server.kill()
            server.wait(timeout=30)
            raise AssertionError("server did not become ready")
        time.sleep(0.5)


def start_worker(settings, weights: Path, log: Path) -> tuple[subprocess.Popen, int]:
    """`megasr worker` on the CPU for ``settings``' Redis, storage and queue: (process, metrics port)."""
    port = free_port()
    env = {
        **os.environ,
        "MEGASR_REDIS_URL": settings.redis_url,
        "MEGASR_STORAGE_URL": settings.storage_url,
        "MEGASR_QUEUE_NAME": settings.queue_name,
        "MEGASR_WEIGHTS": str(weights),
        "MEGASR_HOME": str(settings.home),
    }
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("megasr")), "worker", "--metrics-port", str(port), "--device", "cpu"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    return process, port


def wait_ready(process: subprocess.Popen, port: int, timeout: float = 180) -> None:
    """Until the worker's /readyz on ``port`` answers 200; fails if it exits first, TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "worker exited during start-up"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("worker did not become ready")
