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


#: the samplers of the denoising loop (``megasr_core.pipelines.samplers``); DDPM is the paper's
DDPM, DPMPP_2M, UNIPC = "ddpm", "dpmpp-2m", "unipc"
SAMPLERS = (DDPM, DPMPP_2M, UNIPC)
#: the fast solvers' own default steps (DDPM's are the model family's: 50, or SeeSR-Turbo's 2)
SAMPLER_STEPS = {DPMPP_2M: 25, UNIPC: 20}


def sampler_problem(value: object) -> str | None:
    """Why ``value`` is not a sampler name, or None."""
    return None if value in SAMPLERS else f"must be one of {', '.join(SAMPLERS)}, got {value!r}"


def default_steps(sampler: str, family_steps: int) -> int:
    """The steps a run takes when it names none: the solver's own, or the model family's for DDPM."""
    return SAMPLER_STEPS.get(sampler, family_steps)


def cfg_interval_problem(value: object) -> str | None:
    """Why ``value`` is not a CFG interval: None (every step), or (start, end) with 0 ≤ start < end ≤ 1,
    the fractions of the schedule whose steps run classifier-free guidance."""
    if value is None:
        return None
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value)
        or not 0 <= value[0] < value[1] <= 1
    ):
        return f"must be two fractions start,end with 0 ≤ start < end ≤ 1, got {value!r}"
    return None


def cfg_on_step(interval: tuple[float, float] | None, index: int, steps: int) -> bool:
    """Whether step ``index`` (0-based) of ``steps`` lies in the CFG ``interval`` (its position
    ``index / steps`` in [start, end)); None: every step."""
    if interval is None:
        return True
    return interval[0] <= index / steps < interval[1]


#: the denoiser's linear layers: "full" (the loaded dtype: fp16 on a GPU, fp32 on a CPU) or "fp8"
#: (``megasr_core.pipelines.precision``; float8 GEMMs on GPUs of compute capability 8.9 and up)
FULL, FP8 = "full", "fp8"
PRECISIONS = (FULL, FP8)


def precision_problem(value: object) -> str | None:
    """Why ``value`` is not a precision, or None."""
    return None if value in PRECISIONS else f"must be one of {', '.join(PRECISIONS)}, got {value!r}"
