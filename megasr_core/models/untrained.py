"""Telling untrained weights from trained ones, so every surface can say which it serves.

Modules that start at zero (the ControlNet's output convolutions, MegaSR's CSM projections and
MSFM γ/β convolutions) still hold exactly zero when nobody trained them, and then contribute
nothing: a model made of them computes plain SD2. Checking for that needs no record of how a
folder was made, so it also catches folders assembled by older versions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

CONTROLNET_UNTRAINED = "ControlNet untrained (its zero-initialized output convolutions are still zero)"


def all_zero(tensors: Iterable[torch.Tensor]) -> bool:
    """True when there is at least one tensor and every one of them is exactly zero."""
    seen = False
    for tensor in tensors:
        seen = True
        if bool(tensor.detach().any()):
            return False
    return seen


def controlnet_untrained(controlnet: nn.Module) -> bool:
    """Whether a ControlNet's zero convolutions (what it adds to the UNet) are all still zero."""
    outputs = [
        p
        for n, p in controlnet.named_parameters()
        if n.startswith(("controlnet_down_blocks.", "controlnet_mid_block."))
    ]
    return all_zero(outputs)
