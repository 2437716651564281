"""``MegaSRDenoiser``: SD2 UNet + ControlNet with MegaSR's CSM and MSFM installed.

One ``nn.Module`` holding the two diffusers models as ``.unet`` and ``.controlnet``: its
construction, forward pass and parameter groups. Loading and saving (the weights folder, the
overlay checkpoint) are in ``denoiser_io.py``, mixed in through :class:`MegaSRWeightsIO`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn

from ..utils import DeviceDtypeMixin
from .conditioning import ConditioningSlot, MegaSRConditioning
from .config import MegaSRConfig
from .controlnet_step import check_control_image, controlnet_then_unet
from .csm import (
    CSM,
    IMAGE_TOKENS_KWARG,
    CSMAttnProcessor,
    check_csm_processors,
    cross_attention_blocks,
    csm_blocks,
    install_csm,
)
from .denoiser_io import NETWORKS, MegaSRWeightsIO, is_megasr_key
from .msfm import MSFM, install_msfm
from .presets import get_preset
from .untrained import CONTROLNET_UNTRAINED, all_zero, controlnet_untrained


def is_trainable_key(name: str) -> bool:
    """Eq. 4's trainable set: the ControlNet whole, and in the UNet only MegaSR's new modules.

    The CSM's visual cross-attention is frozen everywhere (paper Sec. 3.4, figure 2).
    """
    if ".csm.visual_attn." in name:
        return False
    if name.startswith("controlnet."):
        return True
    return name.startswith("unet.") and is_megasr_key(name)


@dataclass(frozen=True)
class ParameterGroups:
    """Named parameters that train and that stay frozen (Eq. 4)."""

    trainable: dict[str, nn.Parameter]
    frozen: dict[str, nn.Parameter]

    def counts(self) -> dict[str, int]:
        return {
            "trainable": sum(p.numel() for p in self.trainable.values()),
            "frozen": sum(p.numel() for p in self.frozen.values()),
        }


class MegaSRDenoiser(MegaSRWeightsIO, DeviceDtypeMixin, nn.Module):
    """Noise prediction of MegaSR (paper Eq. 4): ε_θ(z_t, t, e_t, e_i, guidance, LR)."""

    def __init__(self, unet: UNet2DConditionModel, controlnet: ControlNetModel, config: MegaSRConfig) -> None:
        """Install MegaSR's modules on base diffusers models (build the ControlNet first)."""
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        self.config = config
        self.slot = ConditioningSlot()
        if config.use_csm:
            # UNet text attention is frozen → the visual branch can share its weights (see csm.py).
            install_csm(unet, config.image_embed_dim, copy_attention=False)
            install_csm(controlnet, config.image_embed_dim, copy_attention=True)
        if config.msfm_enabled:
            norm_groups = unet.config.norm_num_groups
            kwargs = dict(
                norm_groups=norm_groups,
                norm_eps=unet.config.norm_eps,
                use_hed=config.hed_enabled,
                use_depth_seg=config.depth_seg_enabled,
                hed_channels=config.hed_channels,
                depth_seg_channels=config.depth_seg_channels,
                hidden_channels=config.msfm_hidden_channels,
                attention_hidden=config.msfm_attention_hidden,
            )
            install_msfm(controlnet, self.slot, **kwargs)
            install_msfm(unet, self.slot, **kwargs)
        self.apply_trainable_flags()
        # Found once: checked at every forward without walking every module of both nets.
        self._csm_blocks = csm_blocks(unet) + csm_blocks(controlnet)
        self._msfm_count = sum(1 for module in self.modules() if isinstance(module, MSFM))

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def extractors_needed(self) -> tuple[str, ...]:
        """Extractors this model's switches consume, in the extractors' order (the tagger always
        feeds the prompt)."""
        config = self.config
        wanted = ["hed"] if config.hed_enabled else []
        if config.depth_seg_enabled:
            wanted += ["depth", "segmentation"]
        if config.use_csm:
            wanted.append("clip")
        return (*wanted, "tagger")

    @property
    def image_token_source(self) -> str | None:
        """Where the CSM's image tokens come from: the degradation-aware CLIP (``None`` without a CSM)."""
        return "clip" if self.config.use_csm else None

    def clear_caches(self) -> None:
        """Drop the CSMs' cached image keys/values (a sampler calls this when a run ends)."""
        for module in self.modules():
            if isinstance(module, CSM):
                module.clear_cache()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(
        cls,
        name: str,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **config_changes: object,
    ) -> MegaSRDenoiser:
        """Random-initialized model of a preset's shapes; ``device="meta"`` allocates nothing.

        ``config_changes`` override :class:`MegaSRConfig` fields (e.g. ``use_csm=False``).
        """
        preset = get_preset(name)
        config = preset.megasr.replace(**config_changes) if config_changes else preset.megasr
        with torch.device(device or "cpu"):
            unet = UNet2DConditionModel(**preset.unet)
            controlnet = ControlNetModel.from_unet(
                unet, conditioning_embedding_out_channels=preset.controlnet_conditioning_channels
            )
            model = cls(unet, controlnet, config)
        return model if dtype is None else model.to(dtype=dtype)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | int | float,
        encoder_hidden_states: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        guidance: Mapping[str, torch.Tensor | None] | None = None,
        control_image: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
        conditioning: MegaSRConditioning | None = None,
    ) -> torch.Tensor:
        """Predict the noise in ``latents``.

        Args:
            latents: ``B×4×h×w`` noisy latents.
            timestep: scalar or ``B`` timesteps.
            encoder_hidden_states: text tokens e_t ``B×77×cross_dim``.
            image_embeds: CLIP image tokens e_i ``B×257×1280`` for the CSM (``None`` = off).
            guidance: image-resolution maps in [0, 1]: ``hed B×1×H×W``, ``depth B×1×H×W``,
                ``seg B×3×H×W``; a missing key turns that signal off.
            control_image: the bicubic-upscaled LR ``B×3×H×W`` in [0, 1] (ControlNet condition).
            conditioning_scale: ControlNet residual scale (1.0 in MegaSR/SeeSR).
            conditioning: the result of :meth:`prepare_conditioning`, instead of ``image_embeds``
                and ``guidance``; a sampler prepares it once and reuses it at every step.
        """
        check_control_image(self.controlnet, latents, control_image)
        batch = latents.shape[0]
        if conditioning is None:
            conditioning = self.prepare_conditioning(image_embeds, guidance, batch, reuse_modulation=False)
        elif image_embeds is not None or guidance is not None:
            raise ValueError("pass either conditioning or image_embeds/guidance, not both")
        elif conditioning.batch_size not in (None, batch):
            raise ValueError(f"conditioning was prepared for batch {conditioning.batch_size}, latents have {batch}")
        check_csm_processors(self.unet, self._csm_blocks)
        attention_kwargs = None
        if conditioning.image_tokens is not None:
            attention_kwargs = {IMAGE_TOKENS_KWARG: conditioning.image_tokens}
        with self.slot.use(conditioning), self._eager_while_filling(conditioning):
            return controlnet_then_unet(
                self.unet,
                self.controlnet,
                latents,
                timestep,
                encoder_hidden_states,
                control_image,
                conditioning_scale,
                attention_kwargs,
            )

    def _eager_while_filling(self, conditioning: MegaSRConditioning) -> contextlib.AbstractContextManager:
        """Compiled nets run eagerly for the forward that fills a run's MSFM modulation cache.

        That first forward resizes the maps and computes every (γ, β) in code kept out of
        ``torch.compile`` graphs; a graph break inside the UNet's loop over its blocks would make
        dynamo give up the whole forward. Every later step finds (γ, β) cached, a plain tensor
        path that compiles into the blocks' graphs.
        """
        filling = (
            conditioning.reuse_modulation
            and not torch.is_grad_enabled()
            and len(conditioning.modulation_cache) < self._msfm_count
            and _compiled(self.unet, self.controlnet)
        )
        return torch.compiler.set_stance("force_eager") if filling else contextlib.nullcontext()

    def prepare_conditioning(
        self,
        image_embeds: torch.Tensor | None,
        guidance: Mapping[str, torch.Tensor | None] | None,
        batch_size: int,
        reuse_modulation: bool = True,
        repeat: int = 1,
    ) -> MegaSRConditioning:
        """Validate and pack the MegaSR inputs of a batch for one or many forwards.

        Inputs the model's ablation switches turn off are dropped here, so they cost nothing.
        With ``reuse_modulation`` (inference), each MSFM computes its γ/β once per conditioning.
        With ``repeat=2`` (classifier-free guidance) ``image_embeds`` and ``guidance`` hold the
        ``batch_size // 2`` images once; both halves of the model batch use them.
        """
        conditioning = MegaSRConditioning.from_inputs(image_embeds, guidance, batch_size, reuse_modulation, repeat)
        if not self.config.use_csm:
            conditioning.image_tokens = None
        if not self.config.hed_enabled:
            conditioning.hed = None
        if not self.config.depth_seg_enabled:
            conditioning.depth_seg = None
        return conditioning

    def set_attn_processor(self, make_processor: type | object) -> None:
        """Change the attention backend everywhere while keeping the CSM processors in place.

        ``make_processor`` is a processor class (instantiated per layer) or an instance.
        """
        for net in (self.unet, self.controlnet):
            for module in net.modules():
                if not hasattr(module, "set_processor") or not hasattr(module, "processor"):
                    continue
                new = make_processor() if isinstance(make_processor, type) else make_processor
                current = module.processor
                if isinstance(current, CSMAttnProcessor):
                    current.base = new
                else:
                    module.set_processor(new)

    # ------------------------------------------------------------------ parameters
    def parameter_groups(self) -> ParameterGroups:
        trainable, frozen = {}, {}
        for name, param in self.named_parameters():
            (trainable if is_trainable_key(name) else frozen)[name] = param
        return ParameterGroups(trainable=trainable, frozen=frozen)

    def apply_trainable_flags(self) -> None:
        """Set ``requires_grad`` to match :meth:`parameter_groups`."""
        for name, param in self.named_parameters():
            param.requires_grad_(is_trainable_key(name))

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        """Parameters per network, split into the SD2 base, the CSM and the MSFM."""
        counts: dict[str, dict[str, int]] = {}
        for net in NETWORKS:
            row = {"base": 0, "csm": 0, "csm_trainable": 0, "msfm": 0}
            for name, param in getattr(self, net).named_parameters():
                parts = name.split(".")
                if "csm" in parts:
                    row["csm"] += param.numel()
                    if "visual_attn" not in parts:
                        row["csm_trainable"] += param.numel()
                elif "msfm" in parts:
                    row["msfm"] += param.numel()
                else:
                    row["base"] += param.numel()
            counts[net] = row
        counts["total"] = {k: sum(counts[n][k] for n in NETWORKS) for k in counts["unet"]}
        counts["total"]["trainable"] = self.parameter_groups().counts()["trainable"]
        return counts

    def untrained_reasons(self) -> list[str]:
        """Why these weights cannot super-resolve (empty when every part was trained)."""
        reasons = [CONTROLNET_UNTRAINED] if controlnet_untrained(self.controlnet) else []
        added = [p for n, p in self.named_parameters() if _is_zero_init(n)]
        if all_zero(added):
            reasons.append("MegaSR modules untrained (CSM and MSFM still zero): plain SD2-base output")
        return reasons

    def cross_attention_block_names(self) -> dict[str, list[str]]:
        return {net: [n for n, _ in cross_attention_blocks(getattr(self, net))] for net in NETWORKS}


def _is_zero_init(name: str) -> bool:
    """MegaSR's parameters that start at zero: the CSM projections and the SAFT γ/β convolutions."""
    return ".csm.proj." in name or (".msfm." in name and (".gamma." in name or ".beta." in name))


def _compiled(*nets: nn.Module) -> bool:
    """Whether any of ``nets`` or their submodules runs through ``torch.compile`` (``Module.compile``)."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for net in nets for m in net.modules())
