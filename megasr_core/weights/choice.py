"""Which weights folder a command loads: the one policy the CLI's upscale, serve and worker share.

``--weights``, else ``$MEGASR_WEIGHTS`` (a folder or a Hub id), else the tiny demo weights, written
on first use and announced as untrained.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .hub import resolve_weights_source
from .layout import default_demo_weights, missing_components

#: The variable that names the weights when no ``--weights`` is given: a folder or a Hub id.
WEIGHTS_ENV = "MEGASR_WEIGHTS"
#: ``megasr upscale``'s steps on untrained tiny weights when no ``--steps`` is given: their output is
#: noise at any step count, so the family's 50 would only make a first run slow
DEMO_STEPS = 10


def resolve_weights(weights: str | Path | None, warn: Callable[[str], None] = lambda message: None) -> Path:
    """The weights folder to load: ``weights``, else ``$MEGASR_WEIGHTS`` (a folder or a Hub id, fetched by
    :func:`megasr_core.weights.hub.resolve_weights_source`), else the tiny demo weights, written on first use.

    The demo weights are random and untrained: ``warn`` hears that (and when they are being written).
    Raises ``FileNotFoundError`` or ``ValueError`` for a source that does not resolve.
    """
    if weights is None and os.environ.get(WEIGHTS_ENV):
        weights = os.environ[WEIGHTS_ENV]
    if weights is not None:
        return resolve_weights_source(weights)
    demo = default_demo_weights()
    if missing_components(demo):
        from .tiny import init_tiny  # torch and diffusers: only when the demo weights must be written

        warn(f"no --weights or {WEIGHTS_ENV}: writing tiny demo weights to {demo}")
        init_tiny(demo, overwrite=True)
    warn(
        "warning: using the tiny demo weights: they are random and UNTRAINED, so the output is not a "
        f"real super-resolution. For real output assemble SeeSR's public weights (megasr weights assemble "
        f"--help; docs/weights.md, 'Real output today') and pass --weights or set {WEIGHTS_ENV}."
    )
    return demo
