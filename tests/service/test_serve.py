"""`megasr serve` with the embedded defaults, as a user runs it on a fresh machine."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

from tests.service.conftest import free_port
from tests.service.test_api import png


def test_serve_embedded_end_to_end(tmp_path, tiny_weights):
    port = free_port()
    env = {**os.environ, "MEGASR_HOME": str(tmp_path / "home"), "MEGASR_WEIGHTS": str(tiny_weights)}
    for key in ("MEGASR_REDIS_URL", "MEGASR_API_KEYS", "MEGASR_STORAGE_URL"):
        env.pop(key, None)
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen([str(Path(sys.executable).with_name("megasr")), "serve", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.5)
        response = httpx.post(f"{base}/v1/upscale", files={"image": ("a.png", png(20, 12), "image/png")},
                              data={"steps": "2"}, timeout=30)
        assert response.status_code == 202, response.text
        job_url = response.headers["location"]
        deadline = time.monotonic() + 180
        while (job := httpx.get(job_url, timeout=10).json())["status"] not in ("succeeded", "failed", "canceled"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["status"] == "succeeded", job
        result = httpx.get(job["result_url"], timeout=30)
        assert Image.open(io.BytesIO(result.content)).size == (80, 48)
        assert (tmp_path / "home" / "valkey").is_dir() and (tmp_path / "home" / "data").is_dir()
        conf = (tmp_path / "home" / "valkey" / "valkey.conf").read_text().splitlines()
        valkey_port = int(next(line.split()[1] for line in conf if line.startswith("port ")))
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    # The embedded Valkey went down with the server: nothing listens on its port any more.
    import socket

    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", valkey_port)) != 0


def test_serve_refuses_a_public_address_without_keys(tmp_path):
    env = {**os.environ, "MEGASR_HOME": str(tmp_path)}
    env.pop("MEGASR_API_KEYS", None)
    result = subprocess.run([str(Path(sys.executable).with_name("megasr")), "serve", "--host", "0.0.0.0"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "without API keys" in result.stderr
