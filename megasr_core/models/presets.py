"""Named model shapes: ``sd2-base`` (real Stable Diffusion 2-base) and ``tiny`` (CPU tests).

Each preset gives the diffusers configs of every network a MegaSR weights directory holds, so
that random-initialized models of exactly the right shapes can be built without downloads.
The ``sd2-base`` values are those of ``stabilityai/stable-diffusion-2-base`` (REFERENCE.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import MegaSRConfig

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


@dataclass(frozen=True)
class Preset:
    """Configs of the networks one MegaSR model is made of."""

    name: str
    unet: dict[str, Any]
    controlnet_conditioning_channels: tuple[int, ...]
    megasr: MegaSRConfig
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


# The DDPM schedule SD2-base was trained with (shared by every preset).
SD2_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "variance_type": "fixed_small",
}

SD2_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": _SD_DOWN,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": _SD_UP,
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
    "upcast_attention": False,
    "dual_cross_attention": False,
}

SD2_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SD2_BASE = Preset(
    name="sd2-base",
    unet=SD2_UNET,
    controlnet_conditioning_channels=(16, 32, 96, 256),
    # CLIP ViT-H/14 tokens in CLIP's projected (joint) space: 257 × 1024 (see extractors/clip_image.py).
    megasr=MegaSRConfig(preset="sd2-base", image_embed_dim=1024, num_image_tokens=257),
    vae=SD2_VAE,
    text_encoder={
        # OpenCLIP ViT-H/14 text tower as SD2 ships it: 24 layers upstream, the last one
        # dropped so the output is the penultimate layer.
        "vocab_size": 49408,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 23,
        "num_attention_heads": 16,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "projection_dim": 512,
        "layer_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    scheduler=SD2_SCHEDULER,
    extra={
        "clip_vision": {
            "hidden_size": 1280,
            "num_hidden_layers": 32,
            "num_attention_heads": 16,
            "intermediate_size": 5120,
            "patch_size": 14,
            "image_size": 224,
            "projection_dim": 1024,
        },
        "ram_embed_dim": 512,
    },  # RAM's image_proj width (SeeSR's image cross-attentions)
)

# Same block structure as SD2-base (3 cross-attention down blocks, a cross-attention mid block,
# 3 cross-attention up blocks, latent factor 8), with tiny widths: a denoiser step takes
# milliseconds on a CPU.
TINY = Preset(
    name="tiny",
    unet={
        **SD2_UNET,
        "sample_size": 16,
        "block_out_channels": (32, 32, 64, 64),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
        "attention_head_dim": (2, 2, 4, 4),
    },
    controlnet_conditioning_channels=(8, 16, 16, 32),
    megasr=MegaSRConfig(
        preset="tiny",
        image_embed_dim=32,  # the tiny CLIP's projection_dim
        num_image_tokens=17,
        msfm_hidden_channels=16,
        msfm_attention_hidden=8,
    ),
    vae={
        **SD2_VAE,
        "block_out_channels": (8, 16, 16, 16),
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "sample_size": 128,
    },
    text_encoder={
        "vocab_size": 514,  # the tiny byte-level tokenizer written by weights.init_tiny
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "projection_dim": 32,
        "layer_norm_eps": 1e-5,
        "bos_token_id": 512,
        "eos_token_id": 513,
        "pad_token_id": 513,
    },
    scheduler=SD2_SCHEDULER,
    extra={
        "clip_vision": {
            "hidden_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 96,
            "patch_size": 8,
            "image_size": 32,
            "projection_dim": 32,
        },
        # SeeSR's image cross-attentions take RAM's embeddings: RAMConfig.tiny().embed_width wide
        "ram_embed_dim": 16,
    },
)

PRESETS: dict[str, Preset] = {p.name: p for p in (SD2_BASE, TINY)}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
