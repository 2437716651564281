"""Relative depth (DAGE_DEP) with Depth-Anything-V2 through transformers.

Loads a transformers ``DepthAnythingForDepthEstimation`` folder (e.g. the ``-hf`` releases of
Depth-Anything-V2 small, base or large). The model predicts relative inverse depth (large =
near); each image's map is scaled to [0, 1], so near = 1, and resized back to the input size.
Preprocessing runs in torch on the model's device: resize keeping the aspect ratio with the
short side at the native 518 (multiples of the 14-pixel patch), ImageNet normalization.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PREPROCESSOR_FILE,
    Extractor,
    native_size,
    normalize,
    per_image_minmax,
    read_preprocessing,
    resize,
)


class DepthExtractor(Extractor):
    """LR images → relative depth ``B×1×H×W`` in [0, 1], near = 1."""

    name = "depth"

    def __init__(
        self,
        model: DepthAnythingForDepthEstimation,
        short_side: int = 518,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        max_long_side: int = 1036,
    ) -> None:
        super().__init__()
        self.model = model
        self.short_side = short_side
        self.mean, self.std = tuple(mean), tuple(std)
        self.max_long_side = max_long_side
        self.patch_size = int(model.config.patch_size)

    @classmethod
    def from_config(cls, config: DepthAnythingConfig, short_side: int = 518) -> DepthExtractor:
        return cls(DepthAnythingForDepthEstimation(config), short_side=short_side)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> DepthExtractor:
        directory = Path(directory)
        model = DepthAnythingForDepthEstimation.from_pretrained(directory)
        mean, std, short_side = read_preprocessing(
            directory, IMAGENET_MEAN, IMAGENET_STD, 518, ("height", "shortest_edge")
        )
        return cls(model, short_side=short_side, mean=mean, std=std)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.model.save_pretrained(directory)
        (directory / PREPROCESSOR_FILE).write_text(
            json.dumps(
                {
                    "image_mean": list(self.mean),
                    "image_std": list(self.std),
                    "size": {"height": self.short_side, "width": self.short_side},
                },
                indent=2,
            )
        )

    def predict(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Raw relative inverse depth ``B×h×w`` for normalized model input (used by training)."""
        return self.model(pixel_values=pixel_values).predicted_depth

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        size = native_size(height, width, self.short_side, multiple=self.patch_size, max_long_side=self.max_long_side)
        return normalize(resize(images, size).clamp(0, 1), self.mean, self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = self._model_input(images)
        height, width = images.shape[-2:]
        depth = self.predict(self.preprocess(images)).unsqueeze(1).float()
        depth = resize(depth, (height, width), mode="bilinear")
        return per_image_minmax(depth).to(images.dtype)
