"""One entry point for a weights folder's denoiser, whatever its family (``megasr.json``)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..families import MEGASR, read_family
from ..models.denoiser import MegaSRDenoiser
from ..models.seesr import SeeSRDenoiser

Denoiser = MegaSRDenoiser | SeeSRDenoiser


def denoiser_class(family: str) -> type[MegaSRDenoiser] | type[SeeSRDenoiser]:
    """The class that holds a family's networks (``seesr`` and ``seesr-turbo`` share one)."""
    return MegaSRDenoiser if family == MEGASR else SeeSRDenoiser


def load_denoiser(
    directory: str | Path, device: str | torch.device | None = None, torch_dtype: torch.dtype | None = None
) -> Denoiser:
    """The denoiser of a weights folder, of the class its family names."""
    return denoiser_class(read_family(directory)).from_pretrained(directory, device=device, torch_dtype=torch_dtype)
