"""Image tags → the text prompt (the paper's RAM/DAPE role), behind a small interface.

RAM has no maintained package, so the default :class:`CLIPZeroShotTagger` tags zero-shot with
the CLIP towers over RAM's 4,585-tag vocabulary and per-tag thresholds (vendored in
``megasr_core/assets``). A tag's score is the probability that "a photo of a {tag}." describes
the image better than the neutral "a photo.":

    p(tag) = sigmoid(logit_scale · (cos(image, tag prompt) − cos(image, neutral prompt)))

Tags whose score reaches their threshold are kept, best first, at most ``max_tags``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from transformers import CLIPTokenizer

from .clip_image import CLIPImageEncoder

TAGS_FILE = "tags.txt"
THRESHOLDS_FILE = "thresholds.txt"
CONFIG_FILE = "tagger.json"


@runtime_checkable
class Tagger(Protocol):
    """Anything that turns a batch of LR images into one list of tags per image."""

    def __call__(self, images: torch.Tensor) -> list[list[str]]: ...


def load_vocabulary(directory: str | Path | None = None) -> tuple[list[str], torch.Tensor]:
    """Tags and per-tag thresholds from ``directory`` (``tags.txt``, ``thresholds.txt``) or RAM's."""
    if directory is not None and (Path(directory) / TAGS_FILE).is_file():
        tags_text = (Path(directory) / TAGS_FILE).read_text(encoding="utf-8")
        thresholds_text = (Path(directory) / THRESHOLDS_FILE).read_text(encoding="utf-8")
    else:
        assets = resources.files("megasr_core.assets")
        tags_text = (assets / "ram_tag_list.txt").read_text(encoding="utf-8")
        thresholds_text = (assets / "ram_tag_list_threshold.txt").read_text(encoding="utf-8")
    tags = [line.strip() for line in tags_text.splitlines() if line.strip()]
    thresholds = [float(line) for line in thresholds_text.splitlines() if line.strip()]
    if len(tags) != len(thresholds):
        raise ValueError(f"tag vocabulary has {len(tags)} tags but {len(thresholds)} thresholds")
    return tags, torch.tensor(thresholds)


class CLIPZeroShotTagger:
    """Zero-shot multi-label tagging with a CLIP model's image and text towers (RAM's fallback)."""

    name = "clip-zero-shot"

    def __init__(
        self,
        encoder: CLIPImageEncoder,
        tokenizer: CLIPTokenizer,
        tags: Sequence[str] | None = None,
        thresholds: torch.Tensor | Sequence[float] | None = None,
        template: str = "a photo of a {}.",
        neutral_prompt: str = "a photo.",
        max_tags: int = 10,
        batch_size: int = 256,
    ) -> None:
        if not encoder.has_text_tower:
            raise ValueError("the zero-shot tagger needs a CLIP model with its text tower (CLIPModel)")
        if tags is None:
            tags, default_thresholds = load_vocabulary()
            thresholds = default_thresholds if thresholds is None else thresholds
        if thresholds is None:
            raise ValueError("give per-tag thresholds with a custom tag list")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.tags = list(tags)
        # On the CPU even when built under ``with torch.device("cuda")``: scores are compared there.
        self.thresholds = torch.as_tensor(thresholds, dtype=torch.float32, device="cpu")
        if len(self.tags) != len(self.thresholds):
            raise ValueError(f"{len(self.tags)} tags but {len(self.thresholds)} thresholds")
        self.template = template
        self.neutral_prompt = neutral_prompt
        self.max_tags = max_tags
        self.batch_size = batch_size
        self._text_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding="max_length",
                truncation=True,
                max_length=self.tokenizer.model_max_length if self.tokenizer.model_max_length < 10_000 else 77,
                return_tensors="pt",
            )
            chunks.append(self.encoder.text_embeddings(batch.input_ids.to(self.encoder.device)))
        return torch.cat(chunks)

    def text_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tag embeddings ``T×P``, neutral embedding ``P``), computed once per device/dtype."""
        key = (self.encoder.device, self.encoder.dtype)
        if key not in self._text_cache:
            tags = self._encode_texts([self.template.format(tag) for tag in self.tags])
            neutral = self._encode_texts([self.neutral_prompt])[0]
            self._text_cache = {key: (tags, neutral)}
        return self._text_cache[key]

    @torch.no_grad()
    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """Per-tag probabilities ``B×T`` in [0, 1]."""
        image = self.encoder.image_embeddings(images)
        tags, neutral = self.text_embeddings()
        margin = image @ tags.T - (image @ neutral).unsqueeze(1)
        return torch.sigmoid(self.encoder.logit_scale * margin)

    def __call__(self, images: torch.Tensor) -> list[list[str]]:
        scores = self.scores(images).cpu()
        keep = scores >= self.thresholds.to(scores.device).unsqueeze(0)
        results = []
        for row, mask in zip(scores, keep):
            ranked = torch.argsort(torch.where(mask, row, torch.full_like(row, -1.0)), descending=True, stable=True)
            chosen = [int(i) for i in ranked[: self.max_tags] if mask[i]]
            results.append([self.tags[i] for i in chosen])
        return results

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TAGS_FILE).write_text("\n".join(self.tags) + "\n", encoding="utf-8")
        (directory / THRESHOLDS_FILE).write_text("\n".join(f"{t:g}" for t in self.thresholds.tolist()) + "\n")
        (directory / CONFIG_FILE).write_text(
            json.dumps(
                {
                    "type": "clip-zero-shot",
                    "template": self.template,
                    "neutral_prompt": self.neutral_prompt,
                    "max_tags": self.max_tags,
                },
                indent=2,
            )
        )

    @classmethod
    def from_pretrained(
        cls, directory: str | Path | None, encoder: CLIPImageEncoder, tokenizer: CLIPTokenizer
    ) -> CLIPZeroShotTagger:
        """Settings and vocabulary from ``directory`` (RAM's vocabulary when it has none)."""
        settings: dict = {}
        if directory is not None and (Path(directory) / CONFIG_FILE).is_file():
            settings = json.loads((Path(directory) / CONFIG_FILE).read_text())
            kind = settings.pop("type", "clip-zero-shot")
            if kind != "clip-zero-shot":
                raise ValueError(f"{directory}: unknown tagger type {kind!r}")
        tags, thresholds = load_vocabulary(directory)
        return cls(encoder, tokenizer, tags, thresholds, **settings)
