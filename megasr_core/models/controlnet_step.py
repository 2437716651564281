"""One denoiser step as SD2 + ControlNet models take it: the ControlNet, then the UNet with its residuals.

MegaSR and SeeSR both run this order (SeeSR's ``pipeline_seesr.py``); what they add travels in
``cross_attention_kwargs`` (the CSM's CLIP tokens, SeeSR's RAM tokens) or in hooks.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel


def check_control_image(controlnet: ControlNetModel, latents: torch.Tensor, control_image: torch.Tensor | None) -> None:
    """The ControlNet condition must be the upscaled LR at the latents' pixel size: ``B×3×8h×8w``."""
    if control_image is None:
        raise ValueError("control_image (the upscaled LR image, B×3×H×W in [0, 1]) is required")
    factor = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)
    expected = (
        latents.shape[0],
        controlnet.config.conditioning_channels,
        latents.shape[-2] * factor,
        latents.shape[-1] * factor,
    )
    if tuple(control_image.shape) != expected:
        raise ValueError(
            f"control_image must have shape {expected} for latents {tuple(latents.shape)}, "
            f"got {tuple(control_image.shape)}"
        )


def controlnet_then_unet(
    unet: UNet2DConditionModel,
    controlnet: ControlNetModel,
    latents: torch.Tensor,
    timestep: torch.Tensor | int | float,
    encoder_hidden_states: torch.Tensor,
    control_image: torch.Tensor,
    conditioning_scale: float,
    attention_kwargs: dict[str, Any] | None,
) -> torch.Tensor:
    """ε: the ControlNet's residuals (scaled) added into the UNet's skip connections and middle."""
    down, mid = controlnet(
        latents,
        timestep,
        encoder_hidden_states=encoder_hidden_states,
        controlnet_cond=control_image.to(latents.dtype),
        conditioning_scale=conditioning_scale,
        cross_attention_kwargs=attention_kwargs,
        return_dict=False,
    )
    return unet(
        latents,
        timestep,
        encoder_hidden_states=encoder_hidden_states,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
        cross_attention_kwargs=attention_kwargs,
        return_dict=False,
    )[0]
