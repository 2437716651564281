"""RAM in the weights directory: loaded when tagger/ holds it, the CLIP tagger as the fallback, the CLI."""

from __future__ import annotations

import logging

import pytest
import torch
from typer.testing import CliRunner

from megasr_core.cli import app
from megasr_core.extractors import GuidanceExtractors, RAMTagger
from megasr_core.extractors.guidance import init_tiny_extractors, install_ram_tagger, tiny_random_ram
from megasr_core.extractors.ram import RAMConfig
from megasr_core.weights.tiny import write_tiny_tokenizer

from .test_ram import dape_checkpoint, ram_checkpoint

CFG = RAMConfig.tiny()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))


def test_ram_folder_is_preferred_and_named(tmp_path, tokenizer, images, caplog):
    init_tiny_extractors(tmp_path, tokenizer, ram_tagger=True)
    with caplog.at_level(logging.INFO, logger="megasr_core.extractors.guidance"):
        extractors = GuidanceExtractors.from_pretrained(tmp_path)
    assert isinstance(extractors.tagger, RAMTagger) and extractors.tagger_name == "ram"
    assert "tagger: ram" in caplog.text and "fallback" not in caplog.text
    out = extractors(images)
    assert out.tagger == "ram"
    assert out.tags == RAMTagger.from_pretrained(tmp_path / "tagger")(images)
    assert any(out.tags) and all(len(t) < len(extractors.tagger.vocabulary) for t in out.tags)
    only_tags = GuidanceExtractors.from_pretrained(tmp_path, enabled=["tagger"])
    assert only_tags.available == ("tagger",)  # RAM needs no CLIP towers
    assert only_tags(images).tags == out.tags


def test_clip_zero_shot_is_the_logged_fallback(tmp_path, tokenizer, images, caplog):
    init_tiny_extractors(tmp_path, tokenizer)
    with caplog.at_level(logging.INFO, logger="megasr_core.extractors.guidance"):
        extractors = GuidanceExtractors.from_pretrained(tmp_path, enabled=["tagger"])
    assert extractors.tagger_name == "clip-zero-shot"
    assert "tagger: clip-zero-shot (fallback" in caplog.text
    assert extractors(images).tagger == "clip-zero-shot"


def test_install_ram_replaces_the_fallback(tmp_path, tokenizer, images):
    init_tiny_extractors(tmp_path / "extractors", tokenizer)
    torch.save({"model": ram_checkpoint(CFG)}, tmp_path / "ram.pth")
    torch.save(dape_checkpoint(CFG), tmp_path / "DAPE.pth")
    installed = install_ram_tagger(tmp_path / "extractors", tmp_path / "ram.pth", tmp_path / "DAPE.pth", config=CFG)
    loaded = GuidanceExtractors.from_pretrained(tmp_path / "extractors", enabled=["tagger"]).tagger
    assert isinstance(loaded, RAMTagger)
    pixels = torch.randn(1, 3, CFG.image_size, CFG.image_size)
    with torch.no_grad():
        assert torch.equal(loaded.tag_logits(pixels), installed.tag_logits(pixels))


def test_cli_init_tiny_with_ram_and_install_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["weights", "init-tiny", str(tmp_path / "w"), "--ram-tagger"])
    assert result.exit_code == 0, result.output
    tagger = GuidanceExtractors.from_pretrained(tmp_path / "w" / "extractors", enabled=["tagger"]).tagger
    assert isinstance(tagger, RAMTagger) and tagger.config == CFG
    torch.testing.assert_close(tagger.label_embed, tiny_random_ram(0).label_embed)
    # The real-size model does not fit a tiny checkpoint: the error names a key, exit code 2.
    torch.save({"model": ram_checkpoint(CFG)}, tmp_path / "ram.pth")
    result = runner.invoke(app, ["weights", "install-ram", str(tmp_path / "w"), "--ram", str(tmp_path / "ram.pth")])
    assert result.exit_code == 2 and "visual_encoder." in result.output
