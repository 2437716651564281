"""The weights directory's layout: what a complete folder holds, its pipeline index, and where
the tiny demo weights live.

Layout (docs/weights.md)::

    model_index.json   diffusers pipeline index (components and their classes)
    megasr.json        the family and its config (MegaSRConfig: preset, switches; SeeSRConfig)
    unet/ controlnet/  the denoiser's save_pretrained (SeeSR families: SeeSR's own layout)
    vae/ text_encoder/ tokenizer/ scheduler/   SD2's (or sd-turbo's) components, diffusers format
    extractors/        guidance extractors (megasr_core.extractors.guidance documents the layout);
                       SeeSR families hold only tagger/ (RAM + DAPE)

Writing a folder is the job of ``tiny`` (random weights for tests and demos) and ``upstream``
(assembly from public releases); ``summary`` says what a folder holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers

from ..models.config import CONFIG_NAME, load_model_config

MODEL_INDEX = "model_index.json"
PIPELINE_CLASS = "MegaSRPipeline"
COMPONENTS: dict[str, tuple[str, str]] = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "controlnet": ("diffusers", "ControlNetModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "scheduler": ("diffusers", "DDPMScheduler"),
}
TINY_MARKER = "tiny_random_weights"
EXTRACTORS_DIR = "extractors"
#: what sd-turbo's scheduler config changes in SD2's (SeeSR-Turbo samples with DDPM built from it)
TURBO_SCHEDULER: dict[str, Any] = {"timestep_spacing": "trailing"}


def write_model_index(directory: Path) -> None:
    index: dict[str, Any] = {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__}
    index.update({name: list(spec) for name, spec in COMPONENTS.items()})
    (directory / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def missing_components(directory: str | Path) -> list[str]:
    """Components of the layout that ``directory`` lacks (empty list = complete)."""
    directory = Path(directory)
    missing = [name for name in (MODEL_INDEX, CONFIG_NAME) if not (directory / name).is_file()]
    missing += [name for name in COMPONENTS if not (directory / name).is_dir()]
    return missing


def default_demo_weights() -> Path:
    """Where the CLI and server keep the tiny demo weights ($MEGASR_HOME, else the user cache)."""
    import os

    home = os.environ.get("MEGASR_HOME")
    base = Path(home) if home else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megasr"
    return base / "tiny-demo"


def is_tiny_random(directory: str | Path) -> bool:
    """Whether ``directory`` holds the untrained tiny demo weights (of any family)."""
    try:
        return bool(load_model_config(directory).extra.get(TINY_MARKER))
    except FileNotFoundError:
        return False
