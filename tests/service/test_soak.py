"""Soak: thousands of jobs through the real service while a worker, Redis and storage fail.

``MEGASR_SOAK_JOBS`` jobs (default 2,000) are submitted over HTTP to the API (uvicorn, in this
process), backed by a Valkey and a SeaweedFS of the test's own and processed by two real
``megasr worker`` processes (tiny model, one step, one torch thread each, batches of up to
``MEGASR_SOAK_MAX_BATCH``). While they run, three faults are injected once each, at fixed
fractions of the finished jobs: a worker is SIGKILLed mid-batch (and a replacement started),
Valkey is restarted (same port, same AOF data), and SeaweedFS is stopped for a few seconds.

Everything is observed from outside: HTTP answers, one webhook per final state (a loopback
receiver), the API's ``/metrics`` and the result images. At the end every accepted job must be
final exactly once (succeeded with its image, or failed with an error code), none lost, none
finished twice. One JSON line of figures is printed (and written to ``MEGASR_SOAK_REPORT``).
Every wait is bounded; the whole run by ``MEGASR_SOAK_TIMEOUT_S`` (default 20 min).
"""

from __future__ import annotations

import io
import json
import os
import statistics
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.config import Settings
from tests.harness.soak_services import S3_ENV, ApiServer, SeaweedFS, Valkey, WorkerPool, worker_env
from tests.harness.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.soak

JOBS = int(os.environ.get("MEGASR_SOAK_JOBS", "2000"))
TIMEOUT_S = float(os.environ.get("MEGASR_SOAK_TIMEOUT_S", "1200"))
#: CPU batches: batching costs a little per job on a CPU (no parallel hardware to fill), but the
#: batch-mate paths (claim, requeue, per-member fencing) are what the faults must exercise
MAX_BATCH = int(os.environ.get("MEGASR_SOAK_MAX_BATCH", "4"))
#: accepted but unfinished jobs the submitter allows: submissions go on through every fault
BACKLOG = 96
#: one denoising step without classifier-free guidance: the cheapest real job (~0.45 s on one core)
JOB_FIELDS = {"steps": "1", "scale": "2", "guidance_scale": "1", "output_format": "png"}
INPUT_SIZE = 32
#: (fault, fraction of jobs finished when it is injected, seconds down)
FAULTS = (("worker_sigkill", 0.2, 0.0), ("redis_restart", 0.45, 3.0), ("storage_outage", 0.7, 3.0))
#: the drain gives up when no job has become final for this long (a requeue after a lost worker
#: takes ~20 s, a retry after a storage error a few seconds): what is left then is lost
STALL_S = 120.0
#: answers after which a submission is retried (same Idempotency-Key): the service is degraded
RETRYABLE = {429, 502, 503, 504}
WEBHOOK_SECRET = "soak-webhook-secret"
METRICS_KEY = "soak-metrics-key-0123"


def input_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


class Finishes:
    """What the webhook receiver saw: one delivery per final state reached (parsed incrementally).

    Each event carries its delivery's ``webhook-id`` header: the same id again is a redelivery
    of one event (at-least-once, allowed); two ids for one job are two final transitions.
    """

    def __init__(self, receiver: WebhookReceiver) -> None:
        self.receiver = receiver
        self._events: list[dict] = []
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def _update(self) -> None:
        with self._lock:
            for call in self.receiver.calls[len(self._events) :]:
                event = json.loads(call.body)
                headers = {name.lower(): value for name, value in call.headers.items()}
                event["_delivery"] = headers.get("webhook-id", f"unnamed-{len(self._events)}")
                self._events.append(event)
                self._ids.add(event["id"])

    def events(self) -> list[dict]:
        self._update()
        return list(self._events)

    def finished(self) -> int:
        self._update()
        return len(self._ids)

    def last_at(self) -> float:
        calls = self.receiver.calls
        return calls[-1].at if calls else 0.0


@dataclass
class Submissions:
    """The submitter's record: job ids by index, latency of each accepted POST, rejections."""

    ids: dict[int, str] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)  # status (or exception name) → count
    server_errors: list[str] = field(default_factory=list)  # 5xx other than 503: bugs
    unexpected: list[str] = field(default_factory=list)  # other non-202 answers
    gave_up: list[int] = field(default_factory=list)
    after_retry: set[str] = field(default_factory=set)  # jobs accepted only after a rejected attempt


def submit_all(
    client: httpx.Client,
    hook_url: str,
    run: str,
    finishes: Finishes,
    record: Submissions,
    deadline: Deadline,
    stop: threading.Event,
) -> None:
    """Submit JOBS jobs, each retried under its own Idempotency-Key until accepted (bounded),
    never more than BACKLOG unfinished at once."""
    for index in range(JOBS):
        while len(record.ids) - finishes.finished() >= BACKLOG and not deadline.passed() and not stop.is_set():
            time.sleep(0.1)
        if deadline.passed() or stop.is_set():
            record.gave_up.extend(range(index, JOBS))
            return
        image = input_png(index)
        fields = {**JOB_FIELDS, "seed": str(index), "webhook_url": hook_url}
        headers = {"Idempotency-Key": f"soak-{run}-{index}"}
        give_up_at = time.monotonic() + 120
        attempts = 0
        while True:
            attempts += 1
            started = time.perf_counter()
            try:
                response = client.post(
                    "/v1/upscale", files={"image": ("in.png", image, "image/png")}, data=fields, headers=headers
                )
            except httpx.TransportError as exc:
                record.rejected[type(exc).__name__] += 1
            else:
                if response.status_code == 202:
                    record.latencies_ms.append((time.perf_counter() - started) * 1000)
                    record.ids[index] = response.json()["id"]
                    if attempts > 1:
                        record.after_retry.add(record.ids[index])
                    break
                record.rejected[str(response.status_code)] += 1
                if response.status_code >= 500 and response.status_code != 503:
                    record.server_errors.append(f"POST #{index}: {response.status_code} {response.text[:300]}")
                elif response.status_code not in RETRYABLE:
                    record.unexpected.append(f"POST #{index}: {response.status_code} {response.text[:300]}")
                    record.gave_up.append(index)
                    break
            if time.monotonic() > give_up_at or deadline.passed():
                record.gave_up.append(index)
                break
            time.sleep(0.25)


def wait_finished(finishes: Finishes, count: int, deadline: Deadline) -> None:
    while finishes.finished() < count and not deadline.passed():
        time.sleep(0.2)


def inject(
    name: str, down_s: float, pool: WorkerPool, valkey: Valkey, seaweed: SeaweedFS, finishes: Finishes, t0: float
) -> dict:
    """One fault; returns its timings (seconds since the soak started, and how long it lasted)."""
    fault: dict = {"fault": name, "at_s": round(time.monotonic() - t0, 1), "finished_before": finishes.finished()}
    if name == "worker_sigkill":
        killed = pool.kill_one()
        started = time.monotonic()
        pool.start_one()
        pool.wait_ready()
        fault.update(pid=killed.pid, replacement_ready_s=round(time.monotonic() - started, 1))
    elif name == "redis_restart":
        started = time.monotonic()
        valkey.stop()
        time.sleep(down_s)
        valkey.start()
        fault["down_s"] = round(time.monotonic() - started, 1)
    elif name == "storage_outage":
        started = time.monotonic()
        seaweed.stop(crash=True)
        time.sleep(down_s)
        seaweed.start()
        fault["down_s"] = round(time.monotonic() - started, 1)
    restored = time.time()
    deadline = Deadline(120)
    while finishes.last_at() <= restored and finishes.finished() < JOBS and not deadline.passed():
        time.sleep(0.1)
    fault["next_finish_after_s"] = round(finishes.last_at() - restored, 1) if finishes.last_at() > restored else None
    return fault


def scrape(client: httpx.Client) -> dict[str, float]:
    """``megasr_jobs_finished_total`` per status and ``megasr_queue_depth`` from the API's /metrics."""
    response = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
    assert response.status_code == 200, response.text[:300]
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "megasr_jobs_finished_total":
                values[f"finished_{sample.labels['status']}"] = sample.value
            elif sample.name == "megasr_queue_depth":
                values["queue_depth"] = sample.value
    return values


@pytest.fixture()
def soak_stack(tmp_path, tiny_weights, monkeypatch):
    """Own Valkey, SeaweedFS, API (uvicorn) and two workers; everything stopped afterwards."""
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "valkey").mkdir()
    (tmp_path / "seaweedfs").mkdir()
    valkey, seaweed = Valkey(tmp_path / "valkey"), SeaweedFS(tmp_path / "seaweedfs")
    receiver = WebhookReceiver(lambda _: 200)
    pool = api = None
    try:
        valkey.start()
        seaweed.start()
        queue, storage_url = f"soak-{uuid.uuid4().hex[:6]}", "s3://megasr/soak"
        settings = Settings(
            redis_url=valkey.url,
            storage_url=storage_url,
            s3_endpoint_url=seaweed.endpoint,
            home=tmp_path,
            queue_name=queue,
            allow_anonymous=True,
            metrics_key=METRICS_KEY,
            webhook_secret=WEBHOOK_SECRET,
            webhook_allow_private=True,
            max_queued_per_tenant=100_000,
            rate_limit_per_minute=1_000_000,
            rate_limit_burst=1_000_000,  # one client submits everything: no tenant limits
            read_rate_limit_per_minute=1_000_000,
            read_rate_limit_burst=1_000_000,
            max_concurrent_reads_per_tenant=1_000,
        )
        api = ApiServer(create_app(settings))
        api.start()
        pool = WorkerPool(
            worker_env(
                valkey.url, storage_url, seaweed.endpoint, queue, tiny_weights, tmp_path, WEBHOOK_SECRET, MAX_BATCH
            ),
            tmp_path,
        )
        pool.start_one()
        pool.start_one()
        pool.wait_ready()
        pool.supervise()
        yield api, pool, valkey, seaweed, receiver
    finally:
        if pool is not None:
            pool.stop_all()
        if api is not None:
            api.stop()
        receiver.close()
        seaweed.stop()
        valkey.stop()


def test_soak_with_worker_redis_and_storage_faults(soak_stack, tmp_path):
    api, pool, valkey, seaweed, receiver = soak_stack
    deadline = Deadline(TIMEOUT_S)
    finishes = Finishes(receiver)
    record = Submissions()
    stop = threading.Event()
    t0 = time.monotonic()
    faults: list[dict] = []
    with httpx.Client(base_url=api.url, timeout=30) as client:
        submitter = threading.Thread(
            target=submit_all,
            name="soak-submitter",
            daemon=True,
            args=(client, receiver.url, uuid.uuid4().hex[:6], finishes, record, deadline, stop),
        )
        submitter.start()
        try:
            for name, fraction, down_s in FAULTS:
                wait_finished(finishes, int(JOBS * fraction), deadline)
                if deadline.passed():
                    break
                faults.append(inject(name, down_s, pool, valkey, seaweed, finishes, t0))
            submitter.join(timeout=max(1.0, deadline.left()))
        finally:
            stop.set()
            submitter.join(timeout=60)

        # Drain: poll every accepted job until it is final (bounded by the overall deadline).
        accepted = dict(record.ids)
        final: dict[str, dict] = {}
        pending = set(accepted.values())
        last: dict[str, dict] = {}  # the latest view of each job still pending
        with ThreadPoolExecutor(max_workers=4) as executor:
            progress_at = time.monotonic()
            while pending and not deadline.passed() and time.monotonic() - progress_at < STALL_S:
                views = list(executor.map(lambda job_id: client.get(f"/v1/jobs/{job_id}"), sorted(pending)))
                for response in views:
                    if response.status_code != 200:
                        continue
                    view = response.json()
                    last[view["id"]] = view
                    if view["status"] in ("succeeded", "failed", "canceled"):
                        final[view["id"]] = view
                        pending.discard(view["id"])
                        progress_at = time.monotonic()
                if pending:
                    time.sleep(1.0)
            settle = Deadline(min(30.0, max(1.0, deadline.left())))  # the last webhooks, and any late duplicate
            while finishes.finished() < len(final) and not settle.passed():
                time.sleep(0.2)
            time.sleep(2.0)
            succeeded = [job for job in final.values() if job["status"] == "succeeded"]

            def result_ok(job: dict) -> bool:
                response = client.get(f"/v1/jobs/{job['id']}/result", follow_redirects=True)
                if response.status_code != 200:
                    return False
                size = Image.open(io.BytesIO(response.content)).size
                return size == (INPUT_SIZE * 2, INPUT_SIZE * 2)

            results = list(executor.map(result_ok, succeeded))
        metrics = scrape(client)
    wall_s = time.monotonic() - t0

    events = finishes.events()
    deliveries = Counter(event["id"] for event in events)  # every POST the receiver got
    transitions = Counter(job_id for job_id, _ in {(event["id"], event["_delivery"]) for event in events})
    failed_codes = Counter(
        (job.get("error") or {}).get("code") or "<none>" for job in final.values() if job["status"] == "failed"
    )
    lost = sorted(pending)
    figures = {
        "jobs": JOBS,
        "accepted": len(accepted),
        "succeeded": len(succeeded),
        "failed": sum(failed_codes.values()),
        "failed_by_code": dict(failed_codes),
        "canceled": sum(1 for job in final.values() if job["status"] == "canceled"),
        "lost": len(lost),
        "lost_jobs": [
            {"id": job_id}
            | {key: last.get(job_id, {}).get(key) for key in ("status", "created_at", "started_at")}
            | {"accepted_after_retry": job_id in record.after_retry}
            for job_id in lost[:10]
        ],
        "accepted_after_retry": len(record.after_retry),
        "results_missing": results.count(False),
        "webhooks": sum(deliveries.values()),
        "webhook_redeliveries": sum(deliveries.values()) - sum(transitions.values()),
        "finished_twice": sorted(job_id for job_id, n in transitions.items() if n > 1)[:10],
        "webhooks_missing": sum(1 for job_id in final if job_id not in deliveries),
        "finished_counter": sum(v for k, v in metrics.items() if k.startswith("finished_")),
        "queue_depth_end": metrics.get("queue_depth"),
        "faults": faults,
        "worker_unexpected_exits": pool.unexpected_exits,
        "post_latency_ms": {
            "p50": _round(percentile(record.latencies_ms, 50)),
            "p99": _round(percentile(record.latencies_ms, 99)),
            "max": _round(max(record.latencies_ms, default=None)),
        },
        "post_rejected": dict(record.rejected),
        "post_server_errors": len(record.server_errors),
        "post_gave_up": len(record.gave_up),
        "max_batch": MAX_BATCH,
        "wall_s": round(wall_s, 1),
        "jobs_per_s": round(len(final) / wall_s, 2) if wall_s else None,
    }
    line = json.dumps(figures, separators=(",", ":"))
    print(f"\nSOAK {line}")
    if os.environ.get("MEGASR_SOAK_REPORT"):
        with open(os.environ["MEGASR_SOAK_REPORT"], "w") as report:
            report.write(line + "\n")

    assert not record.server_errors, record.server_errors[:5]
    assert not record.unexpected, record.unexpected[:5]
    assert len(accepted) == JOBS, f"{JOBS - len(accepted)} jobs never accepted: {figures}"
    assert not lost, f"{len(lost)} accepted jobs never finished, e.g. {lost[:5]}: {figures}"
    assert figures["failed"] == sum(n for code, n in failed_codes.items() if code != "<none>"), (
        "a failed job without an error code"
    )
    assert figures["canceled"] == 0
    assert figures["results_missing"] == 0, f"succeeded jobs without their image: {figures}"
    assert not figures["finished_twice"], f"jobs that reached a final state twice (two webhook events): {figures}"
    assert figures["webhooks_missing"] == 0, f"final jobs without a webhook: {figures}"
    assert figures["finished_counter"] == len(final), f"final transitions != final jobs: {figures}"
    assert figures["queue_depth_end"] == 0, figures
    assert len(faults) == len(FAULTS), f"ran out of time before every fault was injected: {figures}"
    # Only the outages may fail jobs (retries used up): at most the batches in flight meanwhile.
    allowed = JOBS // 10 + 2 * 3 * MAX_BATCH
    assert figures["failed"] <= allowed, f"{figures['failed']} jobs failed (at most {allowed} expected): {figures}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
