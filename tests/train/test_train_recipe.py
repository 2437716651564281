"""Stage-2 recipe (issue 11): the prompt is the HR crop's tags without the quality suffix; HR data flipped and
sharpened."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from skimage import data

from megasr_core.data import USMConfig
from megasr_core.train import MegaSRTrainConfig, MegaSRTrainer


class Recorder:
    """Records what the loaded tagger (RAM or the CLIP fallback) is shown; names each image by its mean."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def tags(self, images: torch.Tensor) -> list[list[str]]:
        self.seen.append(images.detach().clone())
        return [["cat", f"level {image.mean().item():.4f}"] for image in images]


def record(trainer, monkeypatch) -> tuple[Recorder, list[str]]:
    """Patch the tagger's class call (works for module and plain taggers) and the text encoding."""
    recorder, prompts = Recorder(), []
    monkeypatch.setattr(
        type(trainer.pipeline.extractors.tagger), "__call__", lambda self, images: recorder.tags(images)
    )
    encode = trainer.pipeline._encode_text
    monkeypatch.setattr(trainer.pipeline, "_encode_text", lambda texts: prompts.extend(texts) or encode(texts))
    return recorder, prompts


@pytest.fixture(scope="module")
def hr_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipe-hr")
    Image.fromarray(data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(data.coffee()).save(folder / "coffee.png")
    return folder


def make(tiny_weights, hr_folder, tmp_path, **changes) -> MegaSRTrainer:
    values = (
        dict(
            weights=str(tiny_weights),
            train_data=[str(hr_folder)],
            output_dir=str(tmp_path / "run"),
            crop_size=64,
            batch_size=2,
            num_workers=0,
            empty_prompt_probability=0.0,
        )
        | changes
    )
    return MegaSRTrainer(MegaSRTrainConfig(**values))


def test_prompts_are_the_hr_tags_without_the_quality_suffix(tiny_weights, hr_folder, tmp_path, monkeypatch):
    trainer = make(tiny_weights, hr_folder, tmp_path)
    tagger, prompts = record(trainer, monkeypatch)
    batch = {k: torch.stack([trainer.dataset[i][k] for i in range(2)]) for k in ("lr", "hr")}
    trainer._model_inputs(batch)
    (seen,) = tagger.seen  # the tagger ran once, on the HR crops (not the 16×16 LR)
    torch.testing.assert_close(seen, batch["hr"])
    assert prompts == [f"cat, level {image.mean().item():.4f}" for image in batch["hr"]]
    assert not any("high-resolution" in p or "8k" in p for p in prompts)


def test_empty_prompts_and_no_tags(tiny_weights, hr_folder, tmp_path, monkeypatch):
    trainer = make(tiny_weights, hr_folder, tmp_path, use_tags=False)
    tagger, prompts = record(trainer, monkeypatch)
    batch = {k: torch.stack([trainer.dataset[i][k] for i in range(2)]) for k in ("lr", "hr")}
    trainer._model_inputs(batch)
    assert tagger.seen == [] and prompts == ["", ""]


def test_flips_and_usm_are_on_by_default_and_configurable(tiny_weights, hr_folder, tmp_path):
    default = make(tiny_weights, hr_folder, tmp_path).dataset
    assert default.hflip and default.usm == USMConfig()
    plain = make(tiny_weights, hr_folder, tmp_path, use_hflip=False, use_usm=False).dataset
    assert not plain.hflip and plain.usm is None
