"""The bounds of a run's sampling parameters. Pure Python, no torch.

The pipeline checks its arguments against them (``MegaSRPipeline.check_inputs``), and the CLI
checks its options against the same numbers before it loads a model, so a wrong ``--steps`` costs
a one-line error, not a model load followed by a traceback.
"""

from __future__ import annotations

import math

#: the upscaling factors the pipeline runs
MIN_SCALE, MAX_SCALE = 1.0, 8.0
#: denoising steps at most (the schedule has 1,000 training timesteps)
MAX_STEPS = 1000
#: classifier-free guidance scale at most (0 or 1 = off)
MAX_GUIDANCE_SCALE = 50.0
#: the smallest latent tile (pixels / 8); 0 turns tiling off
MIN_TILE_SIZE = 16
#: colour fixes of the output towards the LR (``megasr_core.pipelines.color_fix``)
COLOR_FIX_METHODS = ("adain", "wavelet", "none")


def scale_problem(value: object) -> str | None:
    """Why ``value`` is not a valid scale, or None."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not MIN_SCALE <= value <= MAX_SCALE
    ):
        return f"must be a number from {MIN_SCALE:g} to {MAX_SCALE:g}, got {value!r}"
    return None


def steps_problem(value: object) -> str | None:
    """Why ``value`` is not a valid number of denoising steps, or None."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_STEPS:
        return f"must be an integer from 1 to {MAX_STEPS}, got {value!r}"
    return None


def guidance_scale_problem(value: object) -> str | None:
    """Why ``value`` is not a valid guidance scale, or None."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 <= value <= MAX_GUIDANCE_SCALE
    ):
        return f"must be from 0 to {MAX_GUIDANCE_SCALE:g}, got {value!r}"
    return None


def color_fix_problem(value: object) -> str | None:
    """Why ``value`` is not a colour-fix method, or None."""
    return None if value in COLOR_FIX_METHODS else f"must be one of {', '.join(COLOR_FIX_METHODS)}, got {value!r}"


def tile_size_problem(value: object) -> str | None:
    """Why ``value`` is not a latent tile size (None = auto, 0 = off, else ≥ :data:`MIN_TILE_SIZE`), or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (value != 0 and value < MIN_TILE_SIZE):
        return f"must be 0 (off), None (auto) or at least {MIN_TILE_SIZE} latent pixels, got {value!r}"
    return None
