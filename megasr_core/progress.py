"""Progress bars of the long runs (training, evaluation): totals, rate and ETA on stderr.

One place decides how they look, so ``megasr train`` and ``megasr eval`` read alike. Only the
main process of a distributed run draws one; the others would draw the same bar again.
"""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, unit: str, initial: int = 0, enabled: bool = True) -> tqdm:
    """A bar from ``initial`` to ``total`` ``unit``s; a disabled one accepts updates and draws nothing."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=True)
