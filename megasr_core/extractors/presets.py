"""Extractor configurations: the real upstream shapes and a tiny random set for CPU tests.

Real shapes (no weights here; users download the checkpoints):
- HED: ``lllyasviel/Annotators`` ``ControlNetHED.pth``.
- Depth: ``depth-anything/Depth-Anything-V2-{Small,Base,Large}-hf``.
- Segmentation: ``facebook/mask2former-swin-large-ade-semantic`` (150 ADE20K classes).
- CLIP: ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (vision 1280 wide, 32 layers, 257 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import CLIPConfig, DepthAnythingConfig, Dinov2Config, Mask2FormerConfig, SwinConfig

from .hed import HEDConfig

_DINOV2 = {
    # size: hidden, layers, heads, backbone out_indices, neck sizes, fusion width
    "small": (384, 12, 6, [3, 6, 9, 12], [48, 96, 192, 384], 64),
    "base": (768, 12, 12, [3, 6, 9, 12], [96, 192, 384, 768], 128),
    "large": (1024, 24, 16, [5, 12, 18, 24], [256, 512, 1024, 1024], 256),
}


def depth_anything_v2_config(size: str = "large") -> DepthAnythingConfig:
    hidden, layers, heads, out_indices, neck, fusion = _DINOV2[size]
    backbone = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        layerscale_value=1.0,
        out_indices=out_indices,
        reshape_hidden_states=False,
        apply_layernorm=True,
    )
    return DepthAnythingConfig(
        backbone_config=backbone,
        neck_hidden_sizes=neck,
        fusion_hidden_size=fusion,
        head_hidden_size=32,
        reassemble_hidden_size=hidden,
        reassemble_factors=[4, 2, 1, 0.5],
        patch_size=14,
        depth_estimation_type="relative",
    )


def mask2former_swin_large_ade_config() -> Mask2FormerConfig:
    swin = SwinConfig(
        image_size=384,
        patch_size=4,
        embed_dim=192,
        depths=[2, 2, 18, 2],
        num_heads=[6, 12, 24, 48],
        window_size=12,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return Mask2FormerConfig(
        backbone_config=swin,
        num_labels=150,
        num_queries=100,
        hidden_dim=256,
        feature_size=256,
        mask_feature_size=256,
        encoder_layers=6,
        decoder_layers=10,
        num_attention_heads=8,
        dim_feedforward=2048,
        encoder_feedforward_dim=1024,
    )


def clip_vit_h14_config() -> CLIPConfig:
    return CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "projection_dim": 1024,
        },
        vision_config={
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 16,
            "patch_size": 14,
            "image_size": 224,
            "hidden_act": "gelu",
            "projection_dim": 1024,
        },
        projection_dim=1024,
    )


@dataclass(frozen=True)
class ExtractorPreset:
    hed: HEDConfig
    depth: DepthAnythingConfig
    depth_short_side: int
    segmentation: Mask2FormerConfig
    segmentation_short_side: int
    clip: CLIPConfig
    extra: dict[str, Any] | None = None


def real_preset(depth_size: str = "large") -> ExtractorPreset:
    return ExtractorPreset(
        hed=HEDConfig(),
        depth=depth_anything_v2_config(depth_size),
        depth_short_side=518,
        segmentation=mask2former_swin_large_ade_config(),
        segmentation_short_side=512,
        clip=clip_vit_h14_config(),
    )


def tiny_preset() -> ExtractorPreset:
    """Every extractor at toy width: the whole set runs in well under a second on a CPU."""
    depth_backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=56,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
        apply_layernorm=True,
    )
    depth = DepthAnythingConfig(
        backbone_config=depth_backbone,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        reassemble_hidden_size=32,
        patch_size=14,
        depth_estimation_type="relative",
    )
    swin = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    segmentation = Mask2FormerConfig(
        backbone_config=swin,
        num_labels=150,
        num_queries=8,
        hidden_dim=32,
        feature_size=32,
        mask_feature_size=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=64,
        encoder_feedforward_dim=64,
    )
    clip = CLIPConfig(
        text_config={
            "vocab_size": 514,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "projection_dim": 32,
            "bos_token_id": 512,
            "eos_token_id": 513,
            "pad_token_id": 513,
        },
        vision_config={
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "patch_size": 8,
            "image_size": 32,
            "projection_dim": 32,
        },
        projection_dim=32,
    )
    return ExtractorPreset(
        hed=HEDConfig(channels=(4, 8, 8, 16, 16), native_short_side=64, max_long_side=128),
        depth=depth,
        depth_short_side=56,
        segmentation=segmentation,
        segmentation_short_side=64,
        clip=clip,
    )
