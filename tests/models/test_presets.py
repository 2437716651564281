"""Presets: sd2-base matches real SD2-base shapes exactly and builds on the meta device."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from megasr_core.models import MegaSRDenoiser, get_preset


@pytest.fixture(scope="module")
def sd2_meta() -> MegaSRDenoiser:
    return MegaSRDenoiser.from_preset("sd2-base", device="meta")


def test_sd2_base_builds_on_meta_without_allocating(sd2_meta):
    tensors = list(sd2_meta.parameters()) + list(sd2_meta.buffers())
    assert tensors and all(t.is_meta for t in tensors)


def test_sd2_base_keeps_every_vanilla_key_and_shape(sd2_meta):
    preset = get_preset("sd2-base")
    with torch.device("meta"):
        vanilla_unet = UNet2DConditionModel(**preset.unet)
        vanilla_controlnet = ControlNetModel.from_unet(vanilla_unet)
    for ours, vanilla in ((sd2_meta.unet, vanilla_unet), (sd2_meta.controlnet, vanilla_controlnet)):
        ours_sd = ours.state_dict()
        vanilla_sd = vanilla.state_dict()
        missing = [k for k in vanilla_sd if k not in ours_sd]
        assert not missing
        assert all(ours_sd[k].shape == v.shape for k, v in vanilla_sd.items())
        extra = [k for k in ours_sd if k not in vanilla_sd]
        assert extra and all(".csm." in k or ".msfm." in k for k in extra)


def test_sd2_base_parameter_counts(sd2_meta):
    counts = sd2_meta.parameter_counts()
    # REFERENCE.md: SD2-base UNet 866 M, ControlNet from it 364 M.
    assert 865e6 < counts["unet"]["base"] < 867e6
    assert 363e6 < counts["controlnet"]["base"] < 365e6
    for net in ("unet", "controlnet"):
        assert counts[net]["csm"] > 0 and counts[net]["msfm"] > 0
    # MegaSR's additions stay small next to the base model.
    assert counts["total"]["csm"] + counts["total"]["msfm"] < 0.2 * counts["total"]["base"]


def test_sd2_base_shapes_match_reference():
    config = get_preset("sd2-base").unet
    assert config["block_out_channels"] == (320, 640, 1280, 1280)
    assert config["cross_attention_dim"] == 1024
    assert config["attention_head_dim"] == (5, 10, 20, 20)
    assert get_preset("sd2-base").megasr.image_embed_dim == 1024


def test_sd2_base_csm_connectors_map_clip_tokens_to_block_width(sd2_meta):
    block = sd2_meta.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert block.csm.connector.in_features == 1024
    assert block.csm.connector.out_features == 1024
    assert block.csm.proj.out_features == 320
    # UNet shares its frozen text attention; the ControlNet keeps a frozen copy of its own.
    assert block.csm.visual_attn is None
    cn_block = sd2_meta.controlnet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert cn_block.csm.visual_attn is not None


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        MegaSRDenoiser.from_preset("sd3")
