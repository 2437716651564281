"""Named crash points on the multi-step paths of a job, for fault-injection tests.

Production code calls :func:`step` between the steps of a path whose crash would leave work
half done (e.g. ``"task:after_output"`` between writing a result and recording it). Normally
it does nothing; a test installs a hook with :func:`crash_at` that raises :class:`Crash` — a
``BaseException``, so no ``except Exception`` on the way absorbs it, like a SIGKILL — and then
checks that the sweeper (``service.jobsystem.sweeper``) brings the job back to a consistent state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_crash_at: set[str] = set()
reached: list[str] = []


class Crash(BaseException):
    """A simulated process death at a named step."""


def step(name: str) -> None:
    if _crash_at and name in _crash_at:
        reached.append(name)
        raise Crash(name)


@contextmanager
def crash_at(*names: str) -> Iterator[None]:
    """Die (raise :class:`Crash`) on reaching any of ``names``, within the ``with`` block."""
    _crash_at.update(names)
    reached.clear()
    try:
        yield
    finally:
        _crash_at.difference_update(names)
