"""MSFM — multimodal signal fusion module (paper: MS-GAM, Sec. 3.5, Eq. 8-9).

After every transformer block (``Transformer2DModel``) of the ControlNet and the UNet:

* stage 1: ``M_c = depth ⊕ seg`` at the block's resolution → conv → norm & act → channel
  attention = ``F_c``; ``F_r = F_c ⊙ M_c`` (Eq. 8);
* stage 2: ``F_h = SAFT(Norm(F), M_h)`` on the HED map and ``F_m = SAFT(Norm(F), F_r)``;
  SAFT(x, g) = x ⊙ γ(g) + β(g) with γ, β two convs after a small conv "MLP" on g (Eq. 9).

Our reading (DESIGN.md): the result is added residually, ``F' = F + F_h + F_m``, and the γ/β
convs start at zero, so a freshly built model computes exactly SD2 + ControlNet.

Installed with a forward hook on each ``Transformer2DModel``; parameters live under
``<transformer>.msfm.*``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel, Transformer2DModelOutput
from torch import nn

from .conditioning import ConditioningSlot

MSFM_ATTR = "msfm"


def _zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: global pooling → bottleneck → sigmoid gate per channel."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.SiLU(),
            nn.Conv2d(hidden, channels, kernel_size=1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(self.pool(x))


class DepthSegFusion(nn.Module):
    """Stage 1 (Eq. 8): F_r = ChannelAttn(Act(Norm(Conv(M_c)))) ⊙ M_c, with M_c = depth ⊕ seg."""

    def __init__(self, channels: int, attention_hidden: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(1, channels)
        self.act = nn.SiLU()
        self.channel_attention = ChannelAttention(channels, attention_hidden)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        features = self.channel_attention(self.act(self.norm(self.conv(maps))))
        return features * maps


class SAFT(nn.Module):
    """Semantic adaptive feature transformation: Norm(F) ⊙ γ(g) + β(g).

    γ and β are zero-initialized, so SAFT outputs zero until it is trained.
    """

    def __init__(self, guidance_channels: int, feature_channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Conv2d(guidance_channels, hidden_channels, kernel_size=3, padding=1),
            nn.SiLU(),
        )
        self.gamma = _zero_conv(hidden_channels, feature_channels)
        self.beta = _zero_conv(hidden_channels, feature_channels)

    def modulation(self, guidance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """γ and β from the guidance alone (independent of the features and the timestep)."""
        shared = self.mlp(guidance)
        return self.gamma(shared), self.beta(shared)

    def forward(self, normed: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.modulation(guidance)
        return normed * gamma + beta


class MSFM(nn.Module):
    """Both stages for one transformer block's output of ``channels`` features."""

    def __init__(
        self,
        channels: int,
        *,
        norm_groups: int,
        norm_eps: float,
        use_hed: bool,
        use_depth_seg: bool,
        hed_channels: int,
        depth_seg_channels: int,
        hidden_channels: int,
        attention_hidden: int,
    ) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=norm_eps, affine=False)
        self.hed_saft = SAFT(hed_channels, channels, hidden_channels) if use_hed else None
        self.fusion = DepthSegFusion(depth_seg_channels, attention_hidden) if use_depth_seg else None
        self.fused_saft = SAFT(depth_seg_channels, channels, hidden_channels) if use_depth_seg else None

    def modulation(
        self, hed: torch.Tensor | None, depth_seg: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Summed (γ, β) of both SAFTs; ``None`` when no active branch has its map.

        Since F_h + F_m = Norm(F) ⊙ (γ_h + γ_m) + (β_h + β_m), one multiply-add applies both.
        It depends on the guidance only, so one denoising run can compute it once.
        """
        terms = []
        if hed is not None and self.hed_saft is not None:
            terms.append(self.hed_saft.modulation(hed))
        if depth_seg is not None and self.fusion is not None:
            terms.append(self.fused_saft.modulation(self.fusion(depth_seg)))
        if not terms:
            return None
        gamma, beta = terms[0]
        for extra_gamma, extra_beta in terms[1:]:
            gamma, beta = gamma + extra_gamma, beta + extra_beta
        return gamma, beta

    def apply(
        self, hidden: torch.Tensor, modulation: tuple[torch.Tensor, torch.Tensor] | None, repeat: int = 1
    ) -> torch.Tensor:
        """F' = F + Norm(F) ⊙ γ + β (Eq. 9, added residually).

        With ``repeat`` > 1 the batch is ``repeat`` copies of the images γ/β were made for (the
        two halves of classifier-free guidance); they broadcast instead of being recomputed.
        """
        if modulation is None:
            return hidden
        gamma, beta = modulation
        normed = self.norm(hidden)
        if repeat > 1:
            shape = hidden.shape
            return hidden + (normed.view(repeat, -1, *shape[1:]) * gamma + beta).view(shape)
        return hidden + (normed * gamma + beta)

    def forward(self, hidden: torch.Tensor, hed: torch.Tensor | None, depth_seg: torch.Tensor | None) -> torch.Tensor:
        return self.apply(hidden, self.modulation(hed, depth_seg))


class _MSFMHook:
    """Forward hook applying a block's MSFM to its ``Transformer2DModel`` output."""

    def __init__(self, msfm: MSFM, slot: ConditioningSlot) -> None:
        self.msfm = msfm
        self.slot = slot

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        conditioning = self.slot.current
        if conditioning is None:
            return None
        sample = output[0] if isinstance(output, tuple) else output.sample
        cache = conditioning.modulation_cache if conditioning.reuse_modulation and not torch.is_grad_enabled() else None
        key = (id(self.msfm), sample.dtype)
        if cache is not None and key in cache:
            # (γ, β) cached for the run, or a CUDA graph's static copies: plain tensor inputs, so
            # torch.compile traces this path into the block's graph (no graph break per block)
            modulation = cache[key]
        else:
            modulation = self._compute(conditioning, sample, cache, key)
        if modulation is None:
            return None
        sample = self.msfm.apply(sample, modulation, repeat=conditioning.repeat)
        if isinstance(output, tuple):
            return (sample, *output[1:])
        return Transformer2DModelOutput(sample=sample)

    # Kept out of torch.compile graphs: it resizes the run's maps and fills a Python cache on the
    # first step of a run, which would otherwise re-trace for every new conditioning.
    @torch.compiler.disable
    def _compute(
        self, conditioning: Any, sample: torch.Tensor, cache: dict | None, key: tuple
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        modulation = self.modulation(conditioning, (sample.shape[-2], sample.shape[-1]), sample.dtype)
        if cache is not None:
            cache[key] = modulation
        return modulation

    def modulation(
        self, conditioning: Any, size: tuple[int, int], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This block's (γ, β) from the conditioning's maps at the block's resolution, or ``None``."""
        hed = conditioning.resized("hed", size, dtype) if self.msfm.hed_saft is not None else None
        depth_seg = conditioning.resized("depth_seg", size, dtype) if self.msfm.fusion is not None else None
        if hed is None and depth_seg is None:
            return None
        return self.msfm.modulation(hed, depth_seg)


def transformer_blocks(model: nn.Module) -> list[tuple[str, Transformer2DModel]]:
    """Every spatial transformer of ``model`` (down, mid and up blocks), in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Transformer2DModel)]


def install_msfm(model: nn.Module, slot: ConditioningSlot, **msfm_kwargs: Any) -> list[str]:
    """Add an MSFM after every ``Transformer2DModel`` of ``model``; returns their names."""
    names = []
    for name, transformer in transformer_blocks(model):
        if hasattr(transformer, MSFM_ATTR):
            raise RuntimeError(f"{name} already has an MSFM installed")
        channels = transformer.config.out_channels or transformer.config.in_channels
        msfm = MSFM(channels, **msfm_kwargs)
        setattr(transformer, MSFM_ATTR, msfm)
        transformer.register_forward_hook(_MSFMHook(msfm, slot))
        names.append(name)
    return names
