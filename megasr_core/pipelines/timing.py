"""Per-stage wall-clock times of a pipeline call (its ``timings``), exact on a GPU with ``profile``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


class StageTimer:
    """Wall-clock seconds per stage; with ``sync`` the GPU is synchronized at each boundary."""

    def __init__(self, device: torch.device, sync: bool) -> None:
        self.sync = sync and device.type == "cuda"
        self.device = device
        self.stages: dict[str, float] = {}
        self.steps: list[float] = []  # seconds per denoising step
        self.started = time.perf_counter()

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = self.now()
        yield
        self.stages[name] = self.stages.get(name, 0.0) + self.now() - start

    def timings(self) -> dict[str, float]:
        """Seconds per stage, the median denoising step and the total since the timer started."""
        timings = {k: round(v, 4) for k, v in self.stages.items()}
        if self.steps:
            timings["denoise_step_median"] = round(float(np.median(self.steps)), 4)
        timings["total"] = round(time.perf_counter() - self.started, 4)
        return timings
