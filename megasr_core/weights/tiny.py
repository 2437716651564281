"""Tiny random weights of any family, for tests and demos: never trained, never downloaded.

``init_tiny`` writes a complete folder of the ``tiny`` preset (marked ``TINY_MARKER`` in its
config, so it is always reported untrained); ``write_tiny_tokenizer`` is a byte-level CLIP
tokenizer that needs no vocabulary download.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..extractors.guidance import init_tiny_extractors, tiny_random_ram
from ..families import MEGASR, SEESR_TURBO, get_family
from ..models.denoiser import MegaSRDenoiser
from ..models.presets import get_preset
from ..models.seesr import SeeSRDenoiser
from .layout import EXTRACTORS_DIR, TINY_MARKER, TURBO_SCHEDULER, write_model_index


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


def init_tiny(directory: str | Path, seed: int = 0, overwrite: bool = False, family: str = MEGASR) -> Path:
    """Write a complete random-initialized ``tiny`` weights directory of a family (tests, demos; untrained)."""
    get_family(family)
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{directory} is not empty (pass overwrite=True / --force to replace it)")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    preset = get_preset("tiny")
    torch.manual_seed(seed)
    denoiser = (
        MegaSRDenoiser.from_preset("tiny") if family == MEGASR else SeeSRDenoiser.from_preset("tiny", family=family)
    )
    # Zero-initialized modules would contribute exactly zero; give them small random values so
    # the tiny model exercises every path (documented: these weights are for tests only).
    _randomize_zero_init(denoiser, seed)
    denoiser.config = denoiser.config.replace(extra={**denoiser.config.extra, TINY_MARKER: True})
    denoiser.save_pretrained(directory)
    AutoencoderKL(**preset.vae).save_pretrained(directory / "vae")
    text_config = CLIPTextConfig(**preset.text_encoder)
    CLIPTextModel(text_config).save_pretrained(directory / "text_encoder")
    tokenizer = write_tiny_tokenizer(directory / "tokenizer")
    DDPMScheduler(**{**preset.scheduler, **(TURBO_SCHEDULER if family == SEESR_TURBO else {})}).save_pretrained(
        directory / "scheduler"
    )
    if family == MEGASR:
        init_tiny_extractors(directory / EXTRACTORS_DIR, tokenizer, seed=seed)
    else:  # SeeSR reads RAM's tags and image embeddings, nothing else
        tiny_random_ram(seed).save_pretrained(directory / EXTRACTORS_DIR / "tagger")
    write_model_index(directory)
    return directory


def _randomize_zero_init(denoiser: MegaSRDenoiser | SeeSRDenoiser, seed: int, std: float = 0.02) -> None:
    """Small random values for the parameters that start at zero: MegaSR's CSM projections and
    MSFM γ/β, and the ControlNet's output convolutions."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            leaf = name.rsplit(".", 2)[-2]
            megasr_module = leaf in ("proj", "gamma", "beta") and (".csm." in name or ".msfm." in name)
            controlnet_output = name.startswith(
                ("controlnet.controlnet_down_blocks.", "controlnet.controlnet_mid_block.")
            )
            if megasr_module or (controlnet_output and denoiser.family != MEGASR):
                param.copy_(torch.randn(param.shape, generator=generator) * std)
