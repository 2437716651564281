"""LoRA (peft) on the depth backbone and the CLIP vision tower (paper Sec. 3.3: r = 8).

The extractor's ``.model`` becomes a peft ``PeftModel``: attach for fine-tuning, save the
adapter alone, load it back, and merge it into the base weights for serving.
"""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from .clip_image import CLIPImageEncoder
from .depth import DepthExtractor

ADAPTER_DIR = "lora"

# Attention query/value projections of the backbone only (not the depth head, not the text tower).
TARGET_MODULES = {
    # transformers 5 names them attention.{q,v}_proj; 4.x named them attention.attention.{query,value}
    DepthExtractor: r".*backbone\.encoder\.layer\.\d+\.attention\.(attention\.)?(q_proj|v_proj|query|value)",
    CLIPImageEncoder: r".*vision_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|v_proj)",
}


def _target(extractor: nn.Module) -> str:
    for cls, pattern in TARGET_MODULES.items():
        if isinstance(extractor, cls):
            return pattern
    raise TypeError(f"LoRA fine-tuning is defined for the depth and CLIP extractors, not {type(extractor).__name__}")


def lora_config(extractor: nn.Module, rank: int = 8, alpha: int | None = None, dropout: float = 0.0) -> LoraConfig:
    return LoraConfig(
        r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, target_modules=_target(extractor), bias="none"
    )


def has_lora(extractor: nn.Module) -> bool:
    return isinstance(extractor.model, PeftModel)


def attach_lora(
    extractor: DepthExtractor | CLIPImageEncoder, rank: int = 8, alpha: int | None = None, dropout: float = 0.0
) -> int:
    """Wrap the extractor's model with fresh LoRA adapters (identity at start); returns their size.

    Base weights are frozen; only the adapters train.
    """
    config = lora_config(extractor, rank, alpha, dropout)
    if has_lora(extractor):
        raise RuntimeError("this extractor already has a LoRA adapter")
    before = {id(p) for p in extractor.model.parameters()}
    extractor.model = get_peft_model(extractor.model, config)
    return sum(p.numel() for p in extractor.model.parameters() if id(p) not in before)


def save_lora(extractor: DepthExtractor | CLIPImageEncoder, directory: str | Path) -> Path:
    """Write only the adapter (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    if not has_lora(extractor):
        raise RuntimeError("no LoRA adapter attached")
    directory = Path(directory)
    extractor.model.save_pretrained(directory, safe_serialization=True)
    return directory


def load_lora(extractor: DepthExtractor | CLIPImageEncoder, directory: str | Path, trainable: bool = False) -> None:
    """Attach a saved adapter to the extractor's base model."""
    if has_lora(extractor):
        raise RuntimeError("this extractor already has a LoRA adapter")
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no LoRA adapter in {directory} (adapter_config.json missing)")
    extractor.model = PeftModel.from_pretrained(extractor.model, directory, is_trainable=trainable)


def merge_lora(extractor: DepthExtractor | CLIPImageEncoder) -> None:
    """Fold the adapter into the base weights (serving: no LoRA overhead per call)."""
    if not has_lora(extractor):
        raise RuntimeError("no LoRA adapter attached")
    extractor.model = extractor.model.merge_and_unload()
