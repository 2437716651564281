"""Latent tiling with Gaussian-weighted blending, so large images fit in bounded memory.

At every denoising step the noise prediction is computed tile by tile over the latent and the
tiles are blended with Gaussian weights (largest at a tile's centre), as SeeSR's sampler does.
Guidance maps and the ControlNet image are cropped to each tile's pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tile:
    """A latent window ``[top:bottom, left:right]``."""

    top: int
    bottom: int
    left: int
    right: int

    def pixels(self, factor: int) -> Tile:
        return Tile(self.top * factor, self.bottom * factor, self.left * factor, self.right * factor)

    def crop(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[..., self.top : self.bottom, self.left : self.right]


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """Window starts covering ``length`` with windows of ``tile`` overlapping by ≥ ``overlap``."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    count = math.ceil((length - tile) / stride) + 1
    # Spread the windows evenly so every overlap is at least ``overlap``.
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def tiles(height: int, width: int, tile: int, overlap: int, multiple: int = 1) -> list[Tile]:
    """Tiles over a latent of ``height×width``; starts snapped to ``multiple`` (UNet stride)."""
    tile_h, tile_w = min(tile, height), min(tile, width)

    def snapped(length: int, size: int) -> list[int]:
        values = [min(length - size, (s // multiple) * multiple) for s in starts(length, size, overlap)]
        return sorted(set(values))

    return [
        Tile(top, top + tile_h, left, left + tile_w)
        for top in snapped(height, tile_h)
        for left in snapped(width, tile_w)
    ]


def gaussian_weights(height: int, width: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``1×1×h×w`` weights: a Gaussian with σ = size / 4 around the tile centre (never zero)."""

    def axis(n: int) -> torch.Tensor:
        positions = torch.arange(n, device=device, dtype=torch.float32)
        centre, sigma = (n - 1) / 2, max(n / 4, 1e-3)
        return torch.exp(-((positions - centre) ** 2) / (2 * sigma**2))

    return (axis(height)[:, None] * axis(width)[None, :]).to(dtype)[None, None]


def tile_groups(tile_list: list[Tile], group_size: int) -> list[list[Tile]]:
    """Consecutive tiles of one shape, ``group_size`` at most per group (one model batch each).

    A run of same-shape tiles is split into as few groups as ``group_size`` allows, of sizes that
    differ by one at most: 9 tiles at 4 per group run as 3 + 3 + 3, not 4 + 4 + 1, so a batch of
    one tile (the GPU's least efficient) is never left over, and there are fewer shapes to capture.
    """
    runs: list[list[Tile]] = []
    for tile in tile_list:
        last = runs[-1] if runs else None
        shape = (tile.bottom - tile.top, tile.right - tile.left)
        if last and (last[0].bottom - last[0].top, last[0].right - last[0].left) == shape:
            last.append(tile)
        else:
            runs.append([tile])
    groups: list[list[Tile]] = []
    for run in runs:
        count = -(-len(run) // group_size)  # ceil
        base, extra = divmod(len(run), count)
        start = 0
        for index in range(count):
            size = base + (1 if index < extra else 0)
            groups.append(run[start : start + size])
            start += size
    return groups


def blend_tiles(
    latents: torch.Tensor,
    tile_list: list[Tile],
    predict: Callable[[Tile], torch.Tensor] | None = None,
    predict_many: Callable[[list[Tile]], list[torch.Tensor]] | None = None,
    group_size: int = 1,
) -> torch.Tensor:
    """Σ w·predict(tile) / Σ w over all tiles (a single tile passes straight through).

    With ``predict_many`` the tiles are predicted ``group_size`` at a time (same-shape tiles
    stacked into one model batch: a GPU runs a few tiles together much faster than in turn).
    """
    if predict_many is None:
        if predict is None:
            raise ValueError("give predict or predict_many")
        predict_many, group_size = (lambda group: [predict(tile) for tile in group]), 1
    if len(tile_list) == 1 and tile_list[0] == Tile(0, latents.shape[-2], 0, latents.shape[-1]):
        return predict_many(tile_list)[0]
    total = torch.zeros_like(latents, dtype=torch.float32)
    weight_sum = torch.zeros((1, 1, *latents.shape[-2:]), device=latents.device, dtype=torch.float32)
    for group in tile_groups(tile_list, max(1, group_size)):
        for tile, prediction in zip(group, predict_many(group)):
            weights = gaussian_weights(tile.bottom - tile.top, tile.right - tile.left, latents.device)
            total[..., tile.top : tile.bottom, tile.left : tile.right] += prediction.float() * weights
            weight_sum[..., tile.top : tile.bottom, tile.left : tile.right] += weights
    return (total / weight_sum).to(latents.dtype)
