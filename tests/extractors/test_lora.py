"""LoRA r=8 on the depth backbone and the CLIP vision tower: adapters only, identity, save, merge."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from megasr_core.extractors import attach_lora, has_lora, load_lora, merge_lora, save_lora

RANK = 8


def target_linears(extractor) -> list[torch.nn.Linear]:
    """Query and value projections of every backbone attention layer (not the text tower)."""
    tower = "backbone.encoder.layer." if extractor.name == "depth" else "vision_model.encoder.layers."
    return [
        module
        for name, module in extractor.named_modules()
        if tower in name
        and isinstance(module, torch.nn.Linear)
        and name.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "query", "value")
    ]


def run(extractor, images):
    with torch.no_grad():
        return extractor(images)


@pytest.fixture(params=["depth", "clip"])
def extractor(request, tiny_extractors):
    return copy.deepcopy(getattr(tiny_extractors, request.param)).eval()


def test_lora_adds_only_adapters_and_starts_as_identity(extractor, photos):
    images = photos["odd"]
    before = run(extractor, images)
    base_params = {n: p.numel() for n, p in extractor.named_parameters()}
    targets = target_linears(extractor)
    assert len(targets) >= 4
    expected = sum(RANK * (m.in_features + m.out_features) for m in targets)
    added = attach_lora(extractor, rank=RANK)
    assert added == expected
    trainable = {n: p for n, p in extractor.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == expected
    assert sum(p.numel() for p in extractor.parameters()) == sum(base_params.values()) + expected
    assert torch.equal(run(extractor, images), before)


def _train_a_little(extractor) -> None:
    with torch.no_grad():
        for name, param in extractor.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)


def test_save_load_and_merge(extractor, photos, tmp_path):
    images = photos["odd"]
    fresh = copy.deepcopy(extractor)
    base_out = run(extractor, images)
    attach_lora(extractor, rank=RANK)
    _train_a_little(extractor)
    trained_out = run(extractor, images)
    assert not torch.allclose(trained_out, base_out)

    save_lora(extractor, tmp_path / "lora")
    saved = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    assert sum(v.numel() for v in saved.values()) == sum(
        p.numel() for n, p in extractor.named_parameters() if "lora_" in n
    )

    load_lora(fresh, tmp_path / "lora")
    assert has_lora(fresh)
    assert torch.allclose(run(fresh, images), trained_out, atol=1e-6)

    merge_lora(fresh)
    assert not has_lora(fresh)
    assert not [n for n, _ in fresh.named_parameters() if "lora_" in n]
    assert torch.allclose(run(fresh, images), trained_out, atol=1e-4, rtol=1e-4)


def test_lora_refuses_other_extractors(tiny_extractors):
    with pytest.raises(TypeError, match="depth and CLIP"):
        attach_lora(copy.deepcopy(tiny_extractors.hed))
