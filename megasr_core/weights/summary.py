"""What a weights directory holds, and whether it can super-resolve (``megasr weights describe``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..extractors.guidance import NAMES as EXTRACTOR_NAMES
from ..identity import TINY_REASON
from .layout import EXTRACTORS_DIR, is_tiny_random, missing_components
from .loading import Denoiser, load_denoiser


def describe(directory: str | Path) -> dict[str, Any]:
    """What a weights directory holds: family, whether it is trained (and what is random),
    config, parameter counts, missing components."""
    directory = Path(directory)
    denoiser = load_denoiser(directory)
    extractors_dir = directory / EXTRACTORS_DIR
    tiny = is_tiny_random(directory)
    reasons = untrained_reasons(directory, denoiser)
    return {
        "directory": str(directory),
        "family": denoiser.family,
        "trained": not reasons,
        "untrained_reasons": reasons,
        "random": ["every weight (tiny preset)"] if tiny else random_parts(denoiser),
        "config": denoiser.config.to_dict(),
        "tiny_random": tiny,
        "missing_components": missing_components(directory),
        "extractors": [n for n in EXTRACTOR_NAMES if (extractors_dir / n).is_dir()],
        "parameters": denoiser.parameter_counts(),
    }


def untrained_reasons(directory: str | Path, denoiser: Denoiser) -> list[str]:
    """Why a folder's weights cannot super-resolve: the tiny demo marker, else what the loaded
    denoiser's still zero-initialized parts say (empty when trained)."""
    return [TINY_REASON] if is_tiny_random(directory) else denoiser.untrained_reasons()


def random_parts(denoiser: Denoiser) -> list[str]:
    """The parts of a denoiser that still hold their initialization (untrained), by name."""
    from ..models.untrained import CONTROLNET_UNTRAINED

    reasons = denoiser.untrained_reasons()
    parts = []
    if CONTROLNET_UNTRAINED in reasons:
        parts.append("controlnet: a copy of the UNet with zero output convolutions")
    if any(reason.startswith("MegaSR modules") for reason in reasons):
        parts.append("unet and controlnet csm/msfm: zero-initialized MegaSR modules")
    return parts
