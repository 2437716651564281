"""CLIP image tokens (DAGE_CLIP) for the CSM: the vision tower's last hidden states.

Loads a transformers ``CLIPModel`` folder (vision and text towers, e.g. the laion2B ViT-H/14
release; the tagger needs the text tower) or a vision-only ``CLIPVisionModel`` folder. For
ViT-H/14 at 224 the tokens are ``B×257×1280`` (CLS + 16×16 patches). Preprocessing as OpenCLIP
does it, in torch: bicubic resize of the short side to 224, centre crop, CLIP mean/std.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from .base import (
    CLIP_MEAN, CLIP_STD, PREPROCESSOR_FILE, center_crop, check_images, native_size, normalize, read_preprocessing,
    resize,
)
from ..utils import DeviceDtypeMixin


class CLIPImageEncoder(DeviceDtypeMixin, nn.Module):
    """LR images → CLIP image tokens ``B×N×D``; also the projected image embedding for tagging."""

    name = "clip"

    def __init__(
        self,
        model: CLIPModel | CLIPVisionModel,
        mean: tuple[float, ...] = CLIP_MEAN,
        std: tuple[float, ...] = CLIP_STD,
    ) -> None:
        super().__init__()
        self.model = model
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_size = int(self.vision_config.image_size)

    @property
    def vision_config(self) -> CLIPVisionConfig:
        config = self.base_model.config
        return config.vision_config if isinstance(config, CLIPConfig) else config

    @property
    def base_model(self) -> CLIPModel | CLIPVisionModel:
        """The transformers model, under a peft wrapper if LoRA is attached."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def has_text_tower(self) -> bool:
        return isinstance(self.base_model, CLIPModel)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // int(self.vision_config.patch_size)) ** 2 + 1

    @classmethod
    def from_config(cls, config: CLIPConfig | CLIPVisionConfig) -> "CLIPImageEncoder":
        model = CLIPModel(config) if isinstance(config, CLIPConfig) else CLIPVisionModel(config)
        return cls(model)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "CLIPImageEncoder":
        directory = Path(directory)
        config = AutoConfig.from_pretrained(directory)
        model_cls = CLIPModel if isinstance(config, CLIPConfig) else CLIPVisionModel
        model = model_cls.from_pretrained(directory)
        mean, std, _ = read_preprocessing(directory, CLIP_MEAN, CLIP_STD)
        return cls(model, mean=mean, std=std)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.base_model.save_pretrained(directory)
        (directory / PREPROCESSOR_FILE).write_text(
            json.dumps({"image_mean": list(self.mean), "image_std": list(self.std),
                        "crop_size": {"height": self.image_size, "width": self.image_size},
                        "size": {"shortest_edge": self.image_size}}, indent=2)
        )

    def _vision(self) -> nn.Module:
        # peft injects LoRA layers in place, so the base model's tower already uses them.
        return self.base_model.vision_model

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        images = check_images(images).to(self.device, self.dtype)
        height, width = images.shape[-2:]
        size = native_size(height, width, self.image_size)
        size = (max(size[0], self.image_size), max(size[1], self.image_size))
        cropped = center_crop(resize(images, size).clamp(0, 1), self.image_size)
        return normalize(cropped, self.mean, self.std)

    def vision_outputs(self, pixel_values: torch.Tensor, output_hidden_states: bool = False):
        return self._vision()(pixel_values=pixel_values, output_hidden_states=output_hidden_states)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Image tokens e_i: the vision tower's last hidden states ``B×N×D``."""
        return self.vision_outputs(self.preprocess(images)).last_hidden_state

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalized projected image embeddings ``B×P`` (needs a full CLIPModel)."""
        if not self.has_text_tower:
            raise ValueError("image embeddings for tagging need a full CLIPModel (vision + text towers)")
        pooled = self.vision_outputs(self.preprocess(images)).pooler_output
        return F.normalize(self.base_model.visual_projection(pooled).float(), dim=-1)

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalized projected text embeddings ``T×P`` from the text tower."""
        if not self.has_text_tower:
            raise ValueError("text embeddings need a full CLIPModel (vision + text towers)")
        model = self.base_model
        pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(model.text_projection(pooled).float(), dim=-1)

    @property
    def logit_scale(self) -> float:
        return float(self.base_model.logit_scale.exp()) if self.has_text_tower else 100.0
