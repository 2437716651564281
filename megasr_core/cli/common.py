"""What several ``megasr`` commands share: the error exit, extras checks, dtype names, weights, logging.

Nothing here imports torch, ``service`` or ``worker`` at module level: ``megasr --help`` stays fast
and works without the optional extras.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NoReturn

import typer

#: what `megasr serve` and `megasr worker` import beyond the library (the [serve] extra)
SERVE_MODULES = (
    "fastapi",
    "uvicorn",
    "multipart",
    "pydantic_settings",
    "redis",
    "rq",
    "boto3",
    "prometheus_client",
    "httpx",
)


def fail(message: str) -> NoReturn:
    """Print ``error: message`` in red and exit with code 2 (a usage error)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def warn(message: str) -> None:
    typer.secho(message, fg=typer.colors.YELLOW, err=True)


def require(extra: str, *modules: str) -> None:
    """Fail with the install command when an optional part of megasr is not installed."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        fail(f"this command needs the [{extra}] extra ({', '.join(missing)} missing): pip install 'megasr[{extra}]'")


def quiet_loading() -> None:
    """No progress bar per weight file: loading (and writing the demo weights) is a line, not eight bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def torch_dtype(name: str | None):
    """``--dtype`` (fp32, fp16, bf16) as a torch dtype; None stays None (the command's default)."""
    import torch

    if name is None:
        return None
    try:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    except KeyError:
        fail(f"--dtype must be fp32, fp16 or bf16, got {name!r}")


def resolve_weights(weights: str | Path | None) -> Path:
    """``megasr_core.weights.choice.resolve_weights``, its warnings in yellow and its errors as ``fail``."""
    from megasr_core.weights.choice import resolve_weights as resolve

    try:
        return resolve(weights, warn=warn)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))


def settings_or_fail(**overrides):
    """``service.config.Settings`` from the environment and the given options; invalid values fail."""
    from pydantic import ValidationError

    from service.config import Settings

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))


def observe(settings, service_name: str) -> None:
    """Logs (MEGASR_LOG_FORMAT, secrets redacted) and, with MEGASR_OTLP_ENDPOINT, traces."""
    from service.logging_setup import configure_from_settings
    from service.tracing import configure_tracing

    configure_from_settings(settings)
    try:
        configure_tracing(settings.otlp_endpoint, service_name)
    except RuntimeError as exc:
        fail(str(exc))
