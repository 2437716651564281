"""Semantic segmentation (DAGE_SEG) → a colour-coded class map, with a pluggable backend.

The paper uses MaskDINO, which has no maintained PyTorch package; the default backend is
transformers' ``Mask2FormerForUniversalSegmentation`` (e.g. an ADE20K semantic checkpoint).
Any backend returning per-class scores ``B×C×h×w`` plugs in (:class:`SegmentationBackend`).
The map the denoiser sees is each pixel's class painted with a fixed palette, in [0, 1].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PREPROCESSOR_FILE,
    Extractor,
    native_size,
    normalize,
    read_preprocessing,
    resize,
)


def class_palette(num_classes: int) -> torch.Tensor:
    """A fixed, distinct RGB colour per class id, ``num_classes×3`` in [0, 1].

    The bit-interleaving colour map of the PASCAL VOC tools: bits of the class id are spread
    over the high bits of R, G and B, so neighbouring ids get clearly different colours.
    """
    colors = torch.zeros(num_classes, 3)
    for class_id in range(num_classes):
        value, r, g, b = class_id + 1, 0, 0, 0  # +1: class 0 is not black (black = "no map")
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colors[class_id] = torch.tensor([r, g, b], dtype=torch.float32) / 255.0
    return colors


@runtime_checkable
class SegmentationBackend(Protocol):
    """A segmentation network: normalized images ``B×3×h×w`` → class scores ``B×C×h'×w'``."""

    num_classes: int

    def class_scores(self, pixel_values: torch.Tensor) -> torch.Tensor: ...


class Mask2FormerBackend(nn.Module):
    """Semantic scores from Mask2Former: Σ_q softmax(class_q) · sigmoid(mask_q)."""

    def __init__(self, model: Mask2FormerForUniversalSegmentation) -> None:
        super().__init__()
        self.model = model
        self.num_classes = int(model.config.num_labels)

    def class_scores(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.model(pixel_values=pixel_values)
        classes = outputs.class_queries_logits.softmax(dim=-1)[..., :-1]  # drop "no object"
        masks = outputs.masks_queries_logits.sigmoid()
        return torch.einsum("bqc,bqhw->bchw", classes, masks)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.class_scores(pixel_values)


class SegmentationExtractor(Extractor):
    """LR images → palette-coloured semantic map ``B×3×H×W`` in [0, 1]."""

    name = "seg"

    def __init__(
        self,
        backend: nn.Module,
        short_side: int = 512,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        max_long_side: int = 1024,
        size_multiple: int = 32,
    ) -> None:
        super().__init__()
        if not isinstance(backend, SegmentationBackend):
            raise TypeError(f"{type(backend).__name__} does not implement SegmentationBackend.class_scores")
        self.backend = backend
        self.short_side = short_side
        self.mean, self.std = tuple(mean), tuple(std)
        self.max_long_side = max_long_side
        self.size_multiple = size_multiple
        self.register_buffer("palette", class_palette(backend.num_classes), persistent=False)

    @classmethod
    def from_config(cls, config: Mask2FormerConfig, short_side: int = 512) -> SegmentationExtractor:
        return cls(Mask2FormerBackend(Mask2FormerForUniversalSegmentation(config)), short_side=short_side)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> SegmentationExtractor:
        directory = Path(directory)
        model = Mask2FormerForUniversalSegmentation.from_pretrained(directory)
        mean, std, short_side = read_preprocessing(
            directory, IMAGENET_MEAN, IMAGENET_STD, 512, ("shortest_edge", "height")
        )
        return cls(Mask2FormerBackend(model), short_side=short_side, mean=mean, std=std)

    def save_pretrained(self, directory: str | Path) -> None:
        if not isinstance(self.backend, Mask2FormerBackend):
            raise TypeError("only the Mask2Former backend can be saved in the transformers layout")
        directory = Path(directory)
        self.backend.model.save_pretrained(directory)
        (directory / PREPROCESSOR_FILE).write_text(
            json.dumps(
                {
                    "image_mean": list(self.mean),
                    "image_std": list(self.std),
                    "size": {"shortest_edge": self.short_side},
                },
                indent=2,
            )
        )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        size = native_size(
            height, width, self.short_side, multiple=self.size_multiple, max_long_side=self.max_long_side
        )
        return normalize(resize(images, size).clamp(0, 1), self.mean, self.std)

    def class_map(self, images: torch.Tensor) -> torch.Tensor:
        """Class id per pixel ``B×H×W`` at the input's resolution."""
        images = self._model_input(images)
        height, width = images.shape[-2:]
        pixel_values = self.preprocess(images)
        scores = self.backend.class_scores(pixel_values)
        # Decide classes at the network's input resolution, then map back with nearest.
        scores = resize(scores.float(), pixel_values.shape[-2:], mode="bilinear")
        labels = scores.argmax(dim=1, keepdim=True).float()
        return resize(labels, (height, width), mode="nearest").squeeze(1).long()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        labels = self.class_map(images)
        colors = self.palette[labels]  # B×H×W×3
        return colors.permute(0, 3, 1, 2).to(self.dtype).contiguous()
