"""CLIP image tokens (DAGE_CLIP) for the CSM, in CLIP's joint image-text embedding space.

The paper encodes LR images "into the same high-dimensional embedding space as textual tags"
(Sec. 3.3) and the CSM's connector then maps "from the CLIP image embedding space to the
diffusion text embedding space" (Sec. 3.4). That space is CLIP's projected one, so by default
(``token_space="projected"``) every token of the vision tower's last layer goes through the
tower's final LayerNorm and ``visual_projection``: ``B×257×1024`` for ViT-H/14 at 224 (CLS +
16×16 patches). ``token_space="hidden"`` gives the raw last hidden states (``B×257×1280``), what
weights folders written before this choice hold (a folder without ``tokens.json`` loads so).

Loads a transformers ``CLIPModel`` folder (vision and text towers, e.g. the laion2B ViT-H/14
release; projected tokens and the zero-shot tagger need both) or a vision-only
``CLIPVisionModel`` folder (hidden tokens only). Preprocessing as OpenCLIP does it, in torch:
bicubic resize of the short side to 224, centre crop, CLIP mean/std.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from ..utils import DeviceDtypeMixin
from .base import (
    CLIP_MEAN,
    CLIP_STD,
    PREPROCESSOR_FILE,
    center_crop,
    check_images,
    native_size,
    normalize,
    read_preprocessing,
    resize,
)

TOKEN_SPACES = ("projected", "hidden")
TOKENS_FILE = "tokens.json"


class CLIPImageEncoder(DeviceDtypeMixin, nn.Module):
    """LR images → CLIP image tokens ``B×N×D``; also the projected image embedding for tagging."""

    name = "clip"

    def __init__(
        self,
        model: CLIPModel | CLIPVisionModel,
        mean: tuple[float, ...] = CLIP_MEAN,
        std: tuple[float, ...] = CLIP_STD,
        token_space: str = "projected",
    ) -> None:
        super().__init__()
        self.model = model
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_size = int(self.vision_config.image_size)
        if token_space not in TOKEN_SPACES:
            raise ValueError(f"token_space must be one of {', '.join(TOKEN_SPACES)}, got {token_space!r}")
        if token_space == "projected" and not self.has_text_tower:
            raise ValueError(
                "projected CLIP tokens need a full CLIPModel (its visual_projection); "
                "a vision-only model gives token_space='hidden'"
            )
        self.token_space = token_space

    @property
    def token_dim(self) -> int:
        """Width of the tokens :meth:`forward` returns (what the CSM connectors take)."""
        if self.token_space == "projected":
            return int(self.base_model.config.projection_dim)
        return int(self.vision_config.hidden_size)

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
    def from_config(cls, config: CLIPConfig | CLIPVisionConfig, token_space: str | None = None) -> CLIPImageEncoder:
        if isinstance(config, CLIPConfig):
            return cls(CLIPModel(config), token_space=token_space or "projected")
        return cls(CLIPVisionModel(config), token_space=token_space or "hidden")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> CLIPImageEncoder:
        directory = Path(directory)
        config = AutoConfig.from_pretrained(directory)
        model_cls = CLIPModel if isinstance(config, CLIPConfig) else CLIPVisionModel
        model = model_cls.from_pretrained(directory)
        mean, std, _ = read_preprocessing(directory, CLIP_MEAN, CLIP_STD)
        tokens_file = directory / TOKENS_FILE
        token_space = json.loads(tokens_file.read_text())["token_space"] if tokens_file.is_file() else "hidden"
        return cls(model, mean=mean, std=std, token_space=token_space)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.base_model.save_pretrained(directory)
        (directory / TOKENS_FILE).write_text(json.dumps({"token_space": self.token_space}) + "\n")
        (directory / PREPROCESSOR_FILE).write_text(
            json.dumps(
                {
                    "image_mean": list(self.mean),
                    "image_std": list(self.std),
                    "crop_size": {"height": self.image_size, "width": self.image_size},
                    "size": {"shortest_edge": self.image_size},
                },
                indent=2,
            )
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

    def tokens(self, outputs) -> torch.Tensor:
        """The CSM's tokens from the vision tower's outputs, in this encoder's token space."""
        hidden = outputs.last_hidden_state
        if self.token_space == "hidden":
            return hidden
        return self.base_model.visual_projection(self._vision().post_layernorm(hidden))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Image tokens e_i ``B×N×token_dim`` (see the module notes for the token space)."""
        return self.tokens(self.vision_outputs(self.preprocess(images)))

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
