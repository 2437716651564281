"""RAM's Swin Transformer image encoder, with parameter names matching RAM's checkpoints.

Written here rather than taken from ``transformers.SwinModel``: RAM keeps one fused ``qkv``
projection (which SeeSR's DAPE LoRA targets as one merged matrix), names its modules
``layers.{i}.blocks.{j}`` / ``layers.{i}.downsample``, and returns the average-pooled token
in front of the last stage's tokens. Matching that layout keeps loading a plain copy.

Maths (Liu et al. 2021, as RAM runs it): 4×4 patch embedding + LayerNorm; per stage, blocks
alternating plain and shifted (by ``window // 2``) window attention with a learned relative
position bias, masked (−100) across the shifted borders; patch merging (2×2 → LayerNorm →
Linear 4C→2C, no bias) between stages. A stage whose feature map is no larger than the window
uses the whole map as its window and never shifts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: additive attention bias between tokens from different regions of a shifted window (RAM's value)
SHIFT_MASK_VALUE = -100.0


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``B×H×W×C`` → ``(B·nW)×window²×C``, windows in row-major order."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def window_merge(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B·nW)×window²×C`` → ``B×H×W×C``."""
    channels = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def relative_position_index(window: int) -> torch.Tensor:
    """``window²×window²`` indices into a ``(2·window−1)²`` bias table (row offset major)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return offsets[..., 0] * (2 * window - 1) + offsets[..., 1]


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """``nW×window²×window²`` additive mask: 0 within a region, −100 across the rolled borders."""
    regions = torch.zeros(1, height, width, 1)
    label = 0
    for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            regions[:, rows, cols, :] = label
            label += 1
    labels = window_partition(regions, window).squeeze(-1)
    different = labels.unsqueeze(1) != labels.unsqueeze(2)
    return torch.zeros(different.shape).masked_fill(different, SHIFT_MASK_VALUE)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, plus the relative position bias."""

    def __init__(self, dim: int, window: int, num_heads: int) -> None:
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def position_bias(self) -> torch.Tensor:
        """``nH×window²×window²``."""
        tokens = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(tokens, tokens, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(B·nW)×N×C``; ``mask``: ``nW×N×N`` or None."""
        windows, tokens, channels = x.shape
        q, k, v = self.qkv(x).view(windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        bias = self.position_bias().unsqueeze(0)  # 1×nH×N×N
        if mask is not None:
            count = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask.to(bias.dtype)[None, :, None]).expand(windows // count, -1, -1, -1, -1)
            bias = bias.reshape(windows, self.num_heads, tokens, tokens)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(windows, tokens, channels))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm (shifted) window attention and MLP, both residual."""

    def __init__(
        self, dim: int, resolution: tuple[int, int], num_heads: int, window: int, shift: int, mlp_ratio: float
    ) -> None:
        super().__init__()
        self.resolution = resolution
        if min(resolution) <= window:  # the whole map is one window: nothing to shift
            window, shift = min(resolution), 0
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shifted_window_mask(*resolution, window, shift) if shift > 0 else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.resolution
        batch, _, channels = x.shape
        h = self.norm1(x).view(batch, height, width, channels)
        if self.shift:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))
        h = self.attn(window_partition(h, self.window), self.attn_mask)
        h = window_merge(h, self.window, height, width)
        if self.shift:
            h = torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + h.reshape(batch, height * width, channels)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2×2 neighbours → one token of 4C channels (order: (0,0), (1,0), (0,1), (1,1)) → LN → 2C."""

    def __init__(self, dim: int, resolution: tuple[int, int]) -> None:
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.resolution
        x = x.view(x.shape[0], height, width, -1)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.flatten(1, 2)))


class SwinStage(nn.Module):
    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        downsample: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio)
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim, resolution) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinEncoder(nn.Module):
    """Image ``B×3×S×S`` → ``B×(1+L)×C``: the mean token, then the last stage's ``L`` tokens."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"{len(depths)} stage depths but {len(num_heads)} head counts")
        self.image_size = image_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        side = image_size // patch_size
        stages = []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            size = side // 2**i
            if size < 1 or (i < len(depths) - 1 and size % 2):
                raise ValueError(f"image size {image_size} cannot be merged down {len(depths) - 1} times")
            stages.append(
                SwinStage(
                    embed_dim * 2**i, (size, size), depth, heads, window_size, mlp_ratio, downsample=i < len(depths) - 1
                )
            )
        self.layers = nn.ModuleList(stages)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"Swin encoder expects {self.image_size}² inputs, got {tuple(pixel_values.shape[-2:])}")
        x = self.patch_embed(pixel_values)
        for stage in self.layers:
            x = stage(x)
        x = self.norm(x)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
