"""Checks of the options a user can get wrong, run before any model loads.

Each wrong option ends the command with one line naming its flag and exit code 2 (``fail``):
a device this machine does not have, a dtype that device cannot run, a step count, scale, tile
size, colour fix, sampler or CFG interval outside the pipeline's bounds
(``megasr_core.parameters``), a port already taken.
torch is imported only to look at the devices, never to load a model.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from megasr_core.parameters import (
    FULL,
    cfg_interval_problem,
    color_fix_problem,
    guidance_scale_problem,
    precision_problem,
    sampler_problem,
    scale_problem,
    steps_problem,
    tile_size_problem,
)

from .common import fail, torch_dtype


def check_sampling(
    *,
    scale: float | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    color_fix: str | None = None,
    tile_size: int | None = None,
    sampler: str | None = None,
) -> None:
    """Fail on the first sampling option outside the pipeline's bounds (None = the model's default)."""
    checks = (
        ("--sampler", sampler, sampler_problem),
        ("--scale", scale, scale_problem),
        ("--steps", steps, steps_problem),
        ("--guidance-scale", guidance_scale, guidance_scale_problem),
        ("--color-fix", color_fix, color_fix_problem),
        ("--tile-size", tile_size, tile_size_problem),
    )
    for flag, value, problem in checks:
        message = problem(value) if value is not None else None
        if message is not None:
            fail(f"{flag} {message}")


def parse_cfg_interval(text: str | None) -> tuple[float, float] | None:
    """``--cfg-interval start,end`` as two fractions of the schedule (None: CFG at every step)."""
    if text is None:
        return None
    try:
        start, end = (float(part) for part in text.split(","))
    except ValueError:
        fail(f"--cfg-interval must be two fractions start,end such as 0,0.6, got {text!r}")
    message = cfg_interval_problem((start, end))
    if message is not None:
        fail(f"--cfg-interval {message}")
    return start, end


def check_device(name: str | None) -> str:
    """The device to load on: ``name`` once this machine has it; None = cuda when there is one, else cpu."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        fail(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cpu":
        return name
    if device.type == "cuda":
        if torch.version.cuda is None:
            fail(f"--device {name}: this torch {torch.__version__} is built without CUDA; use --device cpu")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            fail(f"--device {name}: no CUDA device is visible here; use --device cpu")
        if device.index is not None and device.index >= count:
            fail(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return name
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            fail(f"--device {name}: Apple's MPS is not available here; use --device cpu")
        return name
    fail(f"--device must be cpu, cuda or cuda:N, got {name!r}")


def check_dtype(name: str | None, device: str) -> Any:
    """The torch dtype ``--dtype`` names, once ``device`` can run it; None stays None (the default:
    fp16 on CUDA, fp32 elsewhere)."""
    dtype = torch_dtype(name)  # the names, and the error for any other
    if dtype is None:
        return None
    import torch

    kind = torch.device(device).type
    if dtype == torch.float16 and kind == "cpu":
        fail("--dtype fp16 runs on a GPU only; on the CPU use fp32 (the default) or bf16")
    if dtype == torch.bfloat16 and kind == "cuda" and not torch.cuda.is_bf16_supported():
        fail(f"--dtype bf16: {torch.cuda.get_device_name(torch.device(device))} has no bfloat16; use fp16")
    return dtype


def check_precision(precision: str, device: str, flag: str = "--precision") -> str:
    """``precision`` once ``device`` can run it (fp8: torchao installed, a GPU of compute capability
    8.9+ or the CPU)."""
    message = precision_problem(precision)
    if message is not None:
        fail(f"{flag} {message}")
    if precision == FULL:
        return precision
    import torch

    from megasr_core.pipelines.precision import fp8_problem

    problem = fp8_problem(torch.device(device))
    if problem is not None:
        fail(f"{flag}: {problem}")
    return precision


def check_port(host: str, port: int) -> None:
    """Fail when ``host:port`` cannot be bound (taken, or not an address of this machine), before
    anything loads; the socket is closed again at once (uvicorn binds it later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except (socket.gaierror, UnicodeError) as exc:  # gaierror is an OSError: first
            fail(f"--host {host}: not an address of this machine ({exc})")
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                fail(f"--port {port}: {host}:{port} is already in use; choose another --port (or MEGASR_PORT)")
            if exc.errno == errno.EACCES:
                fail(f"--port {port}: binding {host}:{port} is not permitted here (ports below 1024 need privileges)")
            fail(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})")
