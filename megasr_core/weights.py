"""The MegaSR weights directory: layout, tiny random weights, assembly from upstream SD2-base.

Layout (DESIGN.md)::

    model_index.json   diffusers pipeline index (components and their classes)
    megasr.json        MegaSRConfig (preset, switches)
    unet/ controlnet/  MegaSRDenoiser.save_pretrained
    vae/ text_encoder/ tokenizer/ scheduler/   SD2's components in diffusers/transformers format
    extractors/        guidance extractors (megasr_core.extractors.guidance documents the layout)

Nothing here downloads: ``init_tiny`` writes random weights of the ``tiny`` preset for tests
and demos; ``assemble_from_sd2`` turns a local copy of ``stabilityai/stable-diffusion-2-base``
(plus an optional trained overlay) into a MegaSR directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .extractors.guidance import NAMES as EXTRACTOR_NAMES
from .extractors.guidance import init_tiny_extractors
from .models.config import CONFIG_NAME, MegaSRConfig
from .models.denoiser import MegaSRDenoiser
from .models.presets import get_preset

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


def _byte_level_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE tokenizers (GPT-2, CLIP) use for raw bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, shift = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + shift)
            shift += 1
    return [symbols[b] for b in range(256)]


def write_tiny_tokenizer(directory: Path) -> CLIPTokenizer:
    """A CLIP tokenizer with a byte-level vocabulary and no merges (514 tokens, no download)."""
    directory.mkdir(parents=True, exist_ok=True)
    symbols = _byte_level_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    source = directory / "_source"
    source.mkdir(exist_ok=True)
    (source / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (source / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        vocab=str(source / "vocab.json"),
        merges=str(source / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    tokenizer.save_pretrained(directory)
    shutil.rmtree(source)
    return tokenizer


def init_tiny(directory: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a complete random-initialized ``tiny`` weights directory (tests, demos; untrained)."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{directory} is not empty (pass overwrite=True / --force to replace it)")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    preset = get_preset("tiny")
    torch.manual_seed(seed)
    denoiser = MegaSRDenoiser.from_preset("tiny")
    # Untrained MegaSR modules would contribute exactly zero; give them small random values so
    # the tiny model exercises every path (documented: these weights are for tests only).
    _randomize_zero_init(denoiser, seed)
    denoiser.config = denoiser.config.replace(extra={**denoiser.config.extra, TINY_MARKER: True})
    denoiser.save_pretrained(directory)
    AutoencoderKL(**preset.vae).save_pretrained(directory / "vae")
    text_config = CLIPTextConfig(**preset.text_encoder)
    CLIPTextModel(text_config).save_pretrained(directory / "text_encoder")
    tokenizer = write_tiny_tokenizer(directory / "tokenizer")
    DDPMScheduler(**preset.scheduler).save_pretrained(directory / "scheduler")
    init_tiny_extractors(directory / EXTRACTORS_DIR, tokenizer, seed=seed)
    write_model_index(directory)
    return directory


def _randomize_zero_init(denoiser: MegaSRDenoiser, seed: int, std: float = 0.02) -> None:
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            leaf = name.rsplit(".", 2)[-2]
            if leaf in ("proj", "gamma", "beta") and (".csm." in name or ".msfm." in name):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def default_demo_weights() -> Path:
    """Where the CLI and server keep the tiny demo weights ($MEGASR_HOME, else the user cache)."""
    import os

    home = os.environ.get("MEGASR_HOME")
    base = Path(home) if home else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megasr"
    return base / "tiny-demo"


def is_tiny_random(directory: str | Path) -> bool:
    """Whether ``directory`` holds the untrained tiny demo weights."""
    try:
        return bool(MegaSRConfig.load(directory).extra.get(TINY_MARKER))
    except FileNotFoundError:
        return False


def assemble_from_sd2(
    sd2_directory: str | Path,
    output: str | Path,
    overlay: str | Path | None = None,
    config: MegaSRConfig | None = None,
    seed: int = 0,
    extractors: str | Path | None = None,
) -> Path:
    """Build a MegaSR directory from a local diffusers SD2-base folder and an optional overlay.

    VAE, text encoder and tokenizer are copied as they are; the scheduler becomes DDPM with the
    same noise schedule; the denoiser is the SD2 UNet + a ControlNet initialized from it + MegaSR
    modules (from the overlay when given, else freshly initialized for training). ``extractors``
    is a folder in the ``extractors/`` layout (upstream checkpoints), copied as it is.
    """
    sd2_directory, output = Path(sd2_directory), Path(output)
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (sd2_directory / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"{sd2_directory} is not a diffusers SD2 folder: missing {', '.join(missing)}")
    torch.manual_seed(seed)
    denoiser = MegaSRDenoiser.from_unet_pretrained(sd2_directory / "unet", config=config, overlay=overlay)
    output.mkdir(parents=True, exist_ok=True)
    denoiser.save_pretrained(output)
    for component in ("vae", "text_encoder", "tokenizer"):
        shutil.copytree(sd2_directory / component, output / component, dirs_exist_ok=True)
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(sd2_directory / "scheduler"))
    scheduler.save_pretrained(output / "scheduler")
    if extractors is not None:
        shutil.copytree(Path(extractors), output / EXTRACTORS_DIR, dirs_exist_ok=True)
        settle_clip_token_space(output / EXTRACTORS_DIR / "clip", denoiser.config.image_embed_dim)
    write_model_index(output)
    return output


def settle_clip_token_space(clip_directory: Path, image_embed_dim: int) -> str | None:
    """Record which CLIP tokens the CSM takes (``tokens.json``) in an upstream CLIP folder.

    An upstream folder has no ``tokens.json``; the connector width says which space fits:
    CLIP's projection width → projected tokens, the vision tower's width → hidden states.
    """
    from .extractors.clip_image import TOKENS_FILE

    config_file = clip_directory / "config.json"
    if not config_file.is_file() or (clip_directory / TOKENS_FILE).is_file():
        return None
    config = json.loads(config_file.read_text())
    vision = config.get("vision_config", config)
    if "vision_config" in config and config.get("projection_dim") == image_embed_dim:
        space = "projected"
    elif vision.get("hidden_size") == image_embed_dim:
        space = "hidden"
    else:
        raise ValueError(
            f"{clip_directory}: CLIP gives {vision.get('hidden_size')}-wide hidden or {config.get('projection_dim')}-wide "
            f"projected tokens, but the CSM connectors take {image_embed_dim}"
        )
    (clip_directory / TOKENS_FILE).write_text(json.dumps({"token_space": space}) + "\n")
    return space


def describe(directory: str | Path) -> dict[str, Any]:
    """What a weights directory holds: config, parameter counts, missing components."""
    directory = Path(directory)
    denoiser = MegaSRDenoiser.from_pretrained(directory)
    extractors_dir = directory / EXTRACTORS_DIR
    return {
        "directory": str(directory),
        "config": denoiser.config.to_dict(),
        "tiny_random": is_tiny_random(directory),
        "missing_components": missing_components(directory),
        "extractors": [n for n in EXTRACTOR_NAMES if (extractors_dir / n).is_dir()],
        "parameters": denoiser.parameter_counts(),
    }
