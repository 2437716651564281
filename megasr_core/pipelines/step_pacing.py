"""Progress of the denoising loop read from CUDA events, so the loop never waits for the step it just queued.

Without a sync the host would queue every step of a run at once (with CUDA graphs each is one
launch) and report 100 % while the GPU is still at the first step; with a sync per step the GPU
would idle while the host prepares the next one. :class:`StepPacer` records an event after each
step, reports the steps whose events have completed (a non-blocking query), and holds the host
at most ``lookahead`` steps ahead of the GPU by waiting on an older step's event, so cancel
checks stay within that many steps of the GPU. On a CPU every step is done when it returns.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import torch

#: steps the host may queue ahead of the GPU (two keep the GPU busy while the host prepares a step)
LOOKAHEAD = 2


class StepPacer:
    """Paces one batch's steps; ``on_done(step)`` fires once per finished step, in order."""

    def __init__(self, device: torch.device, on_done: Callable[[int], None], lookahead: int = LOOKAHEAD) -> None:
        self.on_done = on_done
        self.lookahead = max(1, lookahead)
        self.events = device.type == "cuda"
        self.pending: deque[tuple[int, object]] = deque()
        self.durations: list[float] = []  # seconds per finished step
        if self.events:
            self.last = torch.cuda.Event(enable_timing=True)
            self.last.record()
        else:
            self.last = time.perf_counter()

    def launched(self, step: int) -> None:
        """Step ``step`` is queued: report what has finished, and wait while the host is too far ahead."""
        if not self.events:
            now = time.perf_counter()
            self.durations.append(now - self.last)  # type: ignore[operator]
            self.last = now
            self.on_done(step)
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.pending.append((step, event))
        while len(self.pending) > self.lookahead:
            self._finish_oldest(wait=True)
        while self.pending and self.pending[0][1].query():  # type: ignore[attr-defined]
            self._finish_oldest(wait=False)

    def finish(self) -> None:
        """Wait for every queued step and report it."""
        while self.pending:
            self._finish_oldest(wait=True)

    def _finish_oldest(self, wait: bool) -> None:
        step, event = self.pending.popleft()
        if wait:
            event.synchronize()  # type: ignore[attr-defined]
        self.durations.append(self.last.elapsed_time(event) / 1000)  # type: ignore[union-attr]
        self.last = event
        self.on_done(step)
