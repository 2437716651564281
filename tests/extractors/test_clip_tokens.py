"""The CSM's CLIP tokens: CLIP's projected (joint) space by default, recorded in tokens.json."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPVisionConfig

from megasr_core.extractors import tiny_preset
from megasr_core.extractors.clip_image import TOKENS_FILE, CLIPImageEncoder
from megasr_core.weights.upstream import settle_clip_token_space


@pytest.fixture()
def encoder() -> CLIPImageEncoder:
    torch.manual_seed(0)
    return CLIPImageEncoder.from_config(tiny_preset().clip).eval()


@torch.no_grad()
def test_projected_tokens_are_every_token_through_layernorm_and_visual_projection(encoder, photos):
    model = encoder.base_model
    pixels = encoder.preprocess(photos["rgb"])
    hidden = model.vision_model(pixel_values=pixels).last_hidden_state
    ln = model.vision_model.post_layernorm
    normed = (hidden - hidden.mean(-1, keepdim=True)) / torch.sqrt(
        hidden.var(-1, unbiased=False, keepdim=True) + ln.eps
    )
    expected = (normed * ln.weight + ln.bias) @ model.visual_projection.weight.T
    tokens = encoder(photos["rgb"])
    assert encoder.token_space == "projected" and tokens.shape[-1] == encoder.token_dim == model.config.projection_dim
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    # The CLS token equals CLIP's own image embedding (pooled CLS → projection, before normalization).
    pooled = model.vision_model(pixel_values=pixels).pooler_output
    torch.testing.assert_close(tokens[:, 0], model.visual_projection(pooled), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_token_space_survives_save_and_load_and_old_folders_load_as_hidden(encoder, photos, tmp_path):
    encoder.save_pretrained(tmp_path / "clip")
    assert json.loads((tmp_path / "clip" / TOKENS_FILE).read_text()) == {"token_space": "projected"}
    again = CLIPImageEncoder.from_pretrained(tmp_path / "clip")
    assert again.token_space == "projected"
    torch.testing.assert_close(again(photos["rgb"]), encoder(photos["rgb"]))
    (tmp_path / "clip" / TOKENS_FILE).unlink()  # a folder written before the choice existed
    old = CLIPImageEncoder.from_pretrained(tmp_path / "clip")
    assert old.token_space == "hidden" and old(photos["rgb"]).shape[-1] == old.vision_config.hidden_size


def test_vision_only_models_cannot_project():
    config = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    assert CLIPImageEncoder.from_config(config).token_space == "hidden"
    with pytest.raises(ValueError, match="projected CLIP tokens need a full CLIPModel"):
        CLIPImageEncoder.from_config(config, token_space="projected")
    with pytest.raises(ValueError, match="token_space must be one of"):
        CLIPImageEncoder.from_config(tiny_preset().clip, token_space="pooled")


def test_assembling_upstream_clip_records_the_space_the_connectors_take(encoder, tmp_path):
    encoder.base_model.save_pretrained(tmp_path / "clip")  # upstream layout: no tokens.json
    hidden, projected = encoder.vision_config.hidden_size, encoder.base_model.config.projection_dim
    assert settle_clip_token_space(tmp_path / "clip", projected) == "projected"
    (tmp_path / "clip" / TOKENS_FILE).unlink()
    assert settle_clip_token_space(tmp_path / "clip", hidden) == "hidden"
    (tmp_path / "clip" / TOKENS_FILE).unlink()
    with pytest.raises(ValueError, match="the CSM connectors take 7"):
        settle_clip_token_space(tmp_path / "clip", 7)
