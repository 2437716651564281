"""Per-call conditioning shared by every CSM and MSFM inside the UNet and the ControlNet.

diffusers' UNet and ControlNet forwards have no argument for guidance maps, so the denoiser
opens a :class:`ConditioningSlot` for the duration of one forward and the MSFM hooks read the
maps from it. Outside such a forward the slot is empty and the MSFMs are inactive, so calling
``denoiser.unet(...)`` directly computes plain SD2. (The CSM's image tokens go through
``cross_attention_kwargs`` instead: attention blocks are what gradient checkpointing re-runs
during backward, when this slot is already closed. The MSFM hooks sit on the
``Transformer2DModel`` outputs, outside the checkpointed blocks.)

One slot belongs to one denoiser; a denoiser runs one forward at a time (as a GPU worker does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

GUIDANCE_CHANNELS = {"hed": 1, "depth": 1, "seg": 3}


@dataclass
class MegaSRConditioning:
    """Image tokens and guidance maps for one batch, with resized maps cached per resolution.

    Attributes:
        image_tokens: CLIP image tokens ``B×N×D`` for the CSM, or ``None`` (CSM inactive).
        hed: HED edge map ``B×1×H×W`` in [0, 1], or ``None`` (HED branch inactive).
        depth_seg: depth ⊕ segmentation ``B×4×H×W`` in [0, 1], or ``None``; a missing half is zeros.
        reuse_modulation: keep each MSFM's (γ, β) across forwards. They depend on the guidance
            only, so a sampler that prepares the conditioning once computes them once instead of
            at every step. Only used with gradients off (inference).
        repeat: the model's batch is ``repeat`` copies of these images (2 for the halves of
            classifier-free guidance): the maps are held and modulated once, then broadcast.
    """

    image_tokens: torch.Tensor | None = None
    hed: torch.Tensor | None = None
    depth_seg: torch.Tensor | None = None
    reuse_modulation: bool = False
    repeat: int = 1
    _resized: dict[tuple[str, int, int, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)
    modulation_cache: dict[tuple[int, torch.dtype], object] = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int | None:
        """The model batch this conditioning serves (image tokens are stored repeated)."""
        if self.image_tokens is not None:
            return self.image_tokens.shape[0]
        for tensor in (self.hed, self.depth_seg):
            if tensor is not None:
                return tensor.shape[0] * self.repeat
        return None

    @classmethod
    def from_inputs(
        cls,
        image_tokens: torch.Tensor | None,
        guidance: Mapping[str, torch.Tensor | None] | None,
        batch_size: int,
        reuse_modulation: bool = False,
        repeat: int = 1,
    ) -> MegaSRConditioning:
        """Validate user-facing inputs and pack them; errors name the offending input.

        ``batch_size`` is the model's batch; with ``repeat`` the inputs hold
        ``batch_size // repeat`` images (image tokens are repeated here, maps stay single).
        """
        if repeat < 1 or batch_size % repeat:
            raise ValueError(f"batch_size {batch_size} is not a multiple of repeat={repeat}")
        if image_tokens is not None and repeat > 1 and image_tokens.shape[0] == batch_size // repeat:
            image_tokens = image_tokens.repeat(repeat, 1, 1)
        maps_batch = batch_size // repeat
        if image_tokens is not None:
            if image_tokens.ndim != 3 or image_tokens.shape[0] != batch_size:
                raise ValueError(f"image_embeds must be B×N×D with B={batch_size}, got {tuple(image_tokens.shape)}")
        guidance = dict(guidance or {})
        unknown = sorted(set(guidance) - set(GUIDANCE_CHANNELS))
        if unknown:
            raise ValueError(f"unknown guidance keys {unknown}; expected some of {sorted(GUIDANCE_CHANNELS)}")
        maps: dict[str, torch.Tensor] = {}
        for key, value in guidance.items():
            if value is None:
                continue
            channels = GUIDANCE_CHANNELS[key]
            if value.ndim != 4 or value.shape[0] != maps_batch or value.shape[1] != channels:
                raise ValueError(
                    f"guidance[{key!r}] must be B×{channels}×H×W with B={maps_batch}, got {tuple(value.shape)}"
                )
            maps[key] = value
        depth_seg = None
        if "depth" in maps or "seg" in maps:
            depth, seg = maps.get("depth"), maps.get("seg")
            if depth is not None and seg is not None and depth.shape[-2:] != seg.shape[-2:]:
                raise ValueError(
                    f"guidance['depth'] and guidance['seg'] must share H×W, got "
                    f"{tuple(depth.shape[-2:])} and {tuple(seg.shape[-2:])}"
                )
            ref = depth if depth is not None else seg
            assert ref is not None
            if depth is None:
                depth = ref.new_zeros(maps_batch, GUIDANCE_CHANNELS["depth"], *ref.shape[-2:])
            if seg is None:
                seg = ref.new_zeros(maps_batch, GUIDANCE_CHANNELS["seg"], *ref.shape[-2:])
            depth_seg = torch.cat([depth, seg.to(depth.dtype)], dim=1)
        return cls(
            image_tokens=image_tokens,
            hed=maps.get("hed"),
            depth_seg=depth_seg,
            reuse_modulation=reuse_modulation,
            repeat=repeat,
        )

    def resized(self, name: str, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor | None:
        """The map ``name`` ("hed" or "depth_seg") at a block's resolution, computed once per size."""
        source = getattr(self, name)
        if source is None:
            return None
        key = (name, size[0], size[1], dtype)
        cached = self._resized.get(key)
        if cached is None:
            cached = source
            if tuple(cached.shape[-2:]) != tuple(size):
                # Antialiased bilinear keeps thin edges visible when shrinking 8-64x. It runs in float32
                # and the result is cast: torch has no CPU kernel for it in bfloat16, and fp16 weights
                # would blur the thinnest edges before the block sees them.
                cached = F.interpolate(cached.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
            cached = cached.to(dtype)
            self._resized[key] = cached
        return cached


class ConditioningSlot:
    """Holds the conditioning of the forward currently running (or ``None``)."""

    def __init__(self) -> None:
        self.current: MegaSRConditioning | None = None

    @contextlib.contextmanager
    def use(self, conditioning: MegaSRConditioning) -> Iterator[MegaSRConditioning]:
        if self.current is not None:
            raise RuntimeError("a MegaSR forward is already running on this denoiser (not re-entrant)")
        self.current = conditioning
        try:
            yield conditioning
        finally:
            self.current = None
