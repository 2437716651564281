"""``SeeSRDenoiser``: SeeSR's UNet + ControlNet, on diffusers' own models, loading SeeSR's files.

SeeSR (Wu et al., CVPR 2024) is SD2-base + ControlNet with one change: after every text
cross-attention transformer (``Transformer2DModel``) of the UNet's down, mid and up blocks and
of the ControlNet's down and mid blocks, a second transformer of the same shape attends to RAM's
image embeddings (``B×145×512``) instead of the text:

    h ← T_text(h, e_text);  h ← T_image(h, e_ram)

SeeSR forked diffusers' block files for this. Here the image transformers are added through
extension points, as the MSFM is: a module list per block (``block.image_attentions``, SeeSR's
own key names, so ``…down_blocks.N.image_attentions.M.…`` and ``mid_block.image_attentions.0.…``
load unchanged) and a forward hook on each text transformer that runs its image twin on the
output. The RAM tokens reach the hooks in ``cross_attention_kwargs`` (under the name diffusers'
attention processors ignore quietly), so they are an argument of each forward: nothing is kept
between calls, and compiled graphs and CUDA graphs see them as inputs.

Loading and saving (SeeSR's release layout, strict key checks) are in ``seesr_io.py``, mixed in
through :class:`SeeSRWeightsIO`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel, Transformer2DModelOutput
from torch import nn

from ..families import SEESR
from ..utils import DeviceDtypeMixin
from .conditioning import MegaSRConditioning
from .config import SeeSRConfig
from .controlnet_step import check_control_image, controlnet_then_unet
from .csm import IMAGE_TOKENS_KWARG
from .presets import get_preset
from .seesr_io import IMAGE_ATTENTIONS, NETWORKS, SeeSRWeightsIO
from .untrained import CONTROLNET_UNTRAINED, controlnet_untrained

#: width of RAM's image embeddings, which SeeSR's code fixes for its image cross-attentions
RAM_EMBED_DIM = 512


class _ImageAttentionHook:
    """Runs a block's image transformer on its text transformer's output (SeeSR's order)."""

    def __init__(self, image_attention: Transformer2DModel) -> None:
        self.image_attention = image_attention

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        tokens = (kwargs.get("cross_attention_kwargs") or {}).get(IMAGE_TOKENS_KWARG)
        if tokens is None:
            raise ValueError(
                "SeeSR's image cross-attentions need RAM's image embeddings: call the SeeSRDenoiser "
                "(image_embeds=...), not its unet or controlnet alone"
            )
        sample = output[0] if isinstance(output, tuple) else output.sample
        sample = self.image_attention(
            sample, encoder_hidden_states=tokens, attention_mask=kwargs.get("attention_mask"), return_dict=False
        )[0]
        return (sample, *output[1:]) if isinstance(output, tuple) else Transformer2DModelOutput(sample=sample)


def image_attention_like(text_attention: Transformer2DModel, image_embed_dim: int) -> Transformer2DModel:
    """A transformer of the text one's shape whose cross-attention takes ``image_embed_dim``-wide tokens."""
    # (Private keys dropped: ``_use_default_values`` would reset the head counts to the class defaults.)
    config = {k: v for k, v in text_attention.config.items() if not k.startswith("_")}
    return Transformer2DModel.from_config({**config, "cross_attention_dim": image_embed_dim})


def install_image_attentions(model: UNet2DConditionModel | ControlNetModel, image_embed_dim: int) -> list[str]:
    """Give every block with text transformers SeeSR's image transformers; returns the blocks' names."""
    blocks = [("down_blocks." + str(i), b) for i, b in enumerate(model.down_blocks)]
    blocks.append(("mid_block", model.mid_block))
    blocks += [("up_blocks." + str(i), b) for i, b in enumerate(getattr(model, "up_blocks", []))]
    names = []
    for name, block in blocks:
        texts = getattr(block, "attentions", None)
        if not texts:
            continue
        if hasattr(block, IMAGE_ATTENTIONS):
            raise RuntimeError(f"{name} already has image attentions")
        images = nn.ModuleList(image_attention_like(text, image_embed_dim) for text in texts)
        setattr(block, IMAGE_ATTENTIONS, images)
        for text, image in zip(texts, images):
            text.register_forward_hook(_ImageAttentionHook(image), with_kwargs=True)
        names.append(name)
    return names


class SeeSRDenoiser(SeeSRWeightsIO, DeviceDtypeMixin, nn.Module):
    """SeeSR's noise prediction: the ControlNet, then the UNet with its residuals, both given RAM's tokens."""

    #: what the pipeline must run on each LR image for this model (RAM gives tags and tokens)
    extractors_needed: tuple[str, ...] = ("tagger",)
    #: where the image tokens come from: RAM's image embeddings
    image_token_source = "ram"
    #: no CSMs (the CUDA-graph runner pins their keys/values)
    _csm_blocks: list = []

    def __init__(self, unet: UNet2DConditionModel, controlnet: ControlNetModel, config: SeeSRConfig) -> None:
        """Add SeeSR's image transformers to base diffusers models (build the ControlNet first)."""
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        self.config = config
        install_image_attentions(unet, config.image_embed_dim)
        install_image_attentions(controlnet, config.image_embed_dim)

    @property
    def family(self) -> str:
        return self.config.family

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(
        cls,
        name: str,
        family: str = SEESR,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        image_embed_dim: int | None = None,
    ) -> SeeSRDenoiser:
        """Random-initialized model of a preset's shapes; ``device="meta"`` allocates nothing."""
        preset = get_preset(name)
        dim = image_embed_dim or preset.extra.get("ram_embed_dim", RAM_EMBED_DIM)
        config = SeeSRConfig(family=family, preset=name, image_embed_dim=dim)
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
        control_image: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
        conditioning: MegaSRConditioning | None = None,
        guidance: Mapping[str, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Predict the noise in ``latents``.

        Args:
            latents: ``B×4×h×w`` noisy latents.
            timestep: scalar or ``B`` timesteps.
            encoder_hidden_states: text tokens ``B×77×cross_dim``.
            image_embeds: RAM's image embeddings ``B×N×512`` (both CFG halves get the same ones).
            control_image: the bicubic-upscaled LR ``B×3×H×W`` in [0, 1] (ControlNet condition).
            conditioning_scale: ControlNet residual scale (1.0 in SeeSR).
            conditioning: :meth:`prepare_conditioning`'s result, instead of ``image_embeds``.
            guidance: SeeSR takes no guidance maps; only ``None`` or ``{}`` is accepted.
        """
        check_control_image(self.controlnet, latents, control_image)
        assert control_image is not None
        if conditioning is None:
            conditioning = self.prepare_conditioning(image_embeds, guidance, latents.shape[0])
        elif image_embeds is not None or guidance:
            raise ValueError("pass either conditioning or image_embeds, not both")
        tokens = conditioning.image_tokens
        if tokens is None or tokens.shape[0] != latents.shape[0]:
            raise ValueError(
                f"SeeSR needs RAM image embeddings for each of the {latents.shape[0]} latents, got "
                f"{None if tokens is None else tuple(tokens.shape)}"
            )
        return controlnet_then_unet(
            self.unet,
            self.controlnet,
            latents,
            timestep,
            encoder_hidden_states,
            control_image,
            conditioning_scale,
            {IMAGE_TOKENS_KWARG: tokens.to(latents.dtype)},
        )

    def prepare_conditioning(
        self,
        image_embeds: torch.Tensor | None,
        guidance: Mapping[str, torch.Tensor | None] | None,
        batch_size: int,
        reuse_modulation: bool = True,
        repeat: int = 1,
    ) -> MegaSRConditioning:
        """Check and pack RAM's embeddings for a model batch (``repeat=2``: both CFG halves)."""
        if any(value is not None for value in (guidance or {}).values()):
            raise ValueError(
                f"SeeSR takes no guidance maps, got {sorted(k for k, v in (guidance or {}).items() if v is not None)}"
            )
        if image_embeds is None:
            raise ValueError("SeeSR needs RAM's image embeddings (image_embeds, B×N×512)")
        if image_embeds.ndim != 3 or image_embeds.shape[-1] != self.config.image_embed_dim:
            raise ValueError(
                f"image_embeds must be B×N×{self.config.image_embed_dim} (RAM's image embeddings), "
                f"got {tuple(image_embeds.shape)}"
            )
        return MegaSRConditioning.from_inputs(image_embeds, None, batch_size, reuse_modulation, repeat)

    def clear_caches(self) -> None:
        """Nothing is cached between calls (the API every denoiser offers the sampler)."""

    def set_attn_processor(self, make_processor: type | object) -> None:
        """Change the attention backend of both networks (image attentions included)."""
        for net in (self.unet, self.controlnet):
            for module in net.modules():
                if hasattr(module, "set_processor") and hasattr(module, "processor"):
                    module.set_processor(make_processor() if isinstance(make_processor, type) else make_processor)

    # ------------------------------------------------------------------ parameters
    def parameter_counts(self) -> dict[str, dict[str, int]]:
        """Parameters per network, split into the SD2 base and SeeSR's image attentions."""
        counts: dict[str, dict[str, int]] = {}
        for net in NETWORKS:
            row = {"base": 0, "image_attentions": 0}
            for name, param in getattr(self, net).named_parameters():
                row[IMAGE_ATTENTIONS if IMAGE_ATTENTIONS in name.split(".") else "base"] += param.numel()
            counts[net] = row
        counts["total"] = {k: counts["unet"][k] + counts["controlnet"][k] for k in counts["unet"]}
        return counts

    def untrained_reasons(self) -> list[str]:
        """Why these weights cannot super-resolve (empty when every part was trained)."""
        return [CONTROLNET_UNTRAINED] if controlnet_untrained(self.controlnet) else []
