"""What a worker process holds for its whole life: settings, Redis, storage and the pipeline.

The pipeline is loaded once (fp16 on CUDA) before the worker takes jobs; tasks reach it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.app import build_services
from service.config import Settings
from service.deps import Services

_RUNTIME: "WorkerRuntime | None" = None


@dataclass
class WorkerRuntime:
    services: Services
    pipeline: Any  # megasr_core.MegaSRPipeline (imported lazily: torch)


def install_runtime(settings: Settings, pipeline: Any, services: Services | None = None) -> WorkerRuntime:
    global _RUNTIME
    _RUNTIME = WorkerRuntime(services=services or build_services(settings), pipeline=pipeline)
    return _RUNTIME


def get_runtime() -> WorkerRuntime:
    if _RUNTIME is None:
        raise RuntimeError("the worker runtime is not installed (start workers with `megasr worker`)")
    return _RUNTIME
