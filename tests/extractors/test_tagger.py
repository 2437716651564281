"""The zero-shot tagger: tags from the vocabulary, deterministic, thresholds and limits honoured."""

from __future__ import annotations

import torch

from megasr_core.extractors import CLIPZeroShotTagger, load_vocabulary
from megasr_core.families import tags_to_prompt


def test_ram_vocabulary_is_vendored():
    tags, thresholds = load_vocabulary()
    assert len(tags) == len(thresholds) == 4585
    assert tags[0] == "3D CG rendering" and tags[-1] == "zoo"
    assert 0 < thresholds.min() and thresholds.max() <= 1


def test_tags_come_from_the_vocabulary_and_are_deterministic(tiny_extractors, photos):
    tagger = tiny_extractors.tagger
    vocabulary = set(tagger.tags)
    first = tagger(photos["batch"])
    second = tagger(photos["batch"])
    assert first == second
    assert len(first) == 2
    for tags in first:
        assert tags and set(tags) <= vocabulary
        assert len(tags) <= tagger.max_tags and len(set(tags)) == len(tags)


def test_scores_are_probabilities_and_ranked(tiny_extractors, photos):
    tagger = tiny_extractors.tagger
    scores = tagger.scores(photos["rgb"])
    assert scores.shape == (1, len(tagger.tags))
    assert 0 <= scores.min() and scores.max() <= 1
    tags = tagger(photos["rgb"])[0]
    ranked = [scores[0, tagger.tags.index(t)].item() for t in tags]
    assert ranked == sorted(ranked, reverse=True)


def test_thresholds_and_custom_vocabulary(tiny_extractors, photos, tmp_path):
    clip, tokenizer = tiny_extractors.clip, tiny_extractors.tagger.tokenizer
    words = ["cat", "dog", "rocket", "coffee"]
    never = CLIPZeroShotTagger(clip, tokenizer, words, [1.01] * 4)
    assert never(photos["rgb"]) == [[]]
    always = CLIPZeroShotTagger(clip, tokenizer, words, [0.0] * 4, max_tags=3)
    tags = always(photos["rgb"])[0]
    assert len(tags) == 3 and set(tags) <= set(words)
    always.save_pretrained(tmp_path)
    loaded = CLIPZeroShotTagger.from_pretrained(tmp_path, clip, tokenizer)
    assert loaded.tags == words and loaded.max_tags == 3
    assert loaded(photos["rgb"]) == [tags]


def test_prompt_follows_seesr():
    assert tags_to_prompt(["cat", "sofa"], "a cosy room") == "cat, sofa, a cosy room, clean, high-resolution, 8k"
    assert tags_to_prompt([], "") == "clean, high-resolution, 8k"


def test_tagger_needs_thresholds_for_custom_tags(tiny_extractors):
    import pytest

    with pytest.raises(ValueError, match="thresholds"):
        CLIPZeroShotTagger(tiny_extractors.clip, tiny_extractors.tagger.tokenizer, ["cat"])
    with pytest.raises(ValueError, match="1 tags but 2 thresholds"):
        CLIPZeroShotTagger(tiny_extractors.clip, tiny_extractors.tagger.tokenizer, ["cat"], torch.tensor([0.5, 0.5]))
