"""Small helpers shared by the model classes."""

from __future__ import annotations

import torch


class DeviceDtypeMixin:
    """``.device`` and ``.dtype`` of an ``nn.Module`` from its first parameter (as diffusers' models have)."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device  # type: ignore[attr-defined]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype  # type: ignore[attr-defined]
