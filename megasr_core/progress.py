"""Progress bars of the long runs (training, evaluation): totals, rate and ETA on stderr.

One place decides how they look, so ``megasr train`` and ``megasr eval`` read alike. Only the
main process of a distributed run draws one; the others would draw the same bar again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, unit: str, initial: int = 0, enabled: bool = True) -> tqdm:
    """A bar from ``initial`` to ``total`` ``unit``s; a disabled one accepts updates and draws nothing."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=True)


@contextmanager
def stage_bar(names: list[str], desc: str) -> Iterator[Callable[[], None]]:
    """A bar over named stages of a long job (assembling weights): each call of the yielded
    ``done()`` finishes the stage shown and shows the next one's name."""
    remaining = iter(names)
    with progress_bar(len(names), desc, "stage") as bar:
        bar.set_postfix_str(next(remaining, ""), refresh=False)

        def done() -> None:
            bar.set_postfix_str(next(remaining, ""), refresh=False)
            bar.update(1)

        yield done
