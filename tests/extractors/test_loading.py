"""Building all extractors from a weights directory, once, with LoRA adapters merged."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from megasr_core.extractors import GuidanceExtractors, attach_lora, save_lora
from megasr_core.weights.tiny import init_tiny


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("w") / "tiny")


def test_init_tiny_writes_every_extractor(weights_dir):
    folder = weights_dir / "extractors"
    for name in ("hed", "depth", "segmentation", "clip", "tagger"):
        assert (folder / name).is_dir(), name
    assert (folder / "clip" / "tokenizer_config.json").is_file()
    assert len((folder / "tagger" / "tags.txt").read_text().splitlines()) == 4585


def test_load_all_and_run(weights_dir, photos):
    extractors = GuidanceExtractors.from_pretrained(weights_dir / "extractors")
    assert extractors.available == ("hed", "depth", "segmentation", "clip", "tagger")
    assert not any(p.requires_grad for p in extractors.parameters())
    with torch.inference_mode():
        out = extractors(photos["odd"])
    assert out.image_tokens.shape == (1, 17, 32) and len(out.tags) == 1


def test_load_a_subset(weights_dir, photos):
    only = GuidanceExtractors.from_pretrained(weights_dir / "extractors", enabled=["hed", "tagger"])
    assert only.enabled == ("hed", "tagger")
    assert only.depth is None and only.segmentation is None
    with torch.inference_mode():
        out = only(photos["odd"])
    assert out.hed is not None and out.tags is not None and out.image_tokens is None


def test_errors_name_what_is_missing(tmp_path, weights_dir):
    with pytest.raises(FileNotFoundError, match="depth"):
        GuidanceExtractors.from_pretrained(tmp_path, enabled=["depth"])
    with pytest.raises(ValueError, match="unknown extractors"):
        GuidanceExtractors.from_pretrained(weights_dir / "extractors", enabled=["normals"])
    with pytest.raises(ValueError, match="not loaded"):
        GuidanceExtractors.from_pretrained(weights_dir / "extractors", enabled=["hed"])(
            torch.rand(1, 3, 8, 8), enabled=["depth"]
        )


def test_lora_adapters_in_the_weights_dir_are_merged_at_load(weights_dir, tmp_path, photos):
    folder = tmp_path / "extractors"
    shutil.copytree(weights_dir / "extractors", folder)
    reference = GuidanceExtractors.from_pretrained(folder)
    trained = {}
    for name in ("depth", "clip"):
        extractor = copy.deepcopy(getattr(reference, name))
        attach_lora(extractor)
        with torch.no_grad():
            for pname, param in extractor.named_parameters():
                if "lora_B" in pname:
                    param.normal_(0, 0.05)
        save_lora(extractor, folder / name / "lora")
        with torch.no_grad():
            trained[name] = extractor(photos["odd"])
    loaded = GuidanceExtractors.from_pretrained(folder)
    with torch.no_grad():
        assert torch.allclose(loaded.depth(photos["odd"]), trained["depth"], atol=1e-4)
        assert torch.allclose(loaded.clip(photos["odd"]), trained["clip"], atol=1e-4)
    assert not [n for n, _ in loaded.named_parameters() if "lora_" in n]
