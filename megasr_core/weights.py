"""The weights directory: layout, tiny random weights, assembly from upstream releases.

Layout (DESIGN.md)::

    model_index.json   diffusers pipeline index (components and their classes)
    megasr.json        the family and its config (MegaSRConfig: preset, switches; SeeSRConfig)
    unet/ controlnet/  the denoiser's save_pretrained (SeeSR families: SeeSR's own layout)
    vae/ text_encoder/ tokenizer/ scheduler/   SD2's (or sd-turbo's) components, diffusers format
    extractors/        guidance extractors (megasr_core.extractors.guidance documents the layout);
                       SeeSR families hold only tagger/ (RAM + DAPE)

Nothing here downloads: ``init_tiny`` writes random weights of the ``tiny`` preset for tests
and demos; ``assemble_from_sd2`` turns a local copy of ``stabilityai/stable-diffusion-2-base``
(plus an optional trained overlay) into a MegaSR directory; ``assemble_seesr`` turns SeeSR's
release (its ``unet/`` and ``controlnet/``), SD2-base or sd-turbo and RAM (+ DAPE) into a SeeSR
or SeeSR-Turbo directory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .extractors.guidance import NAMES as EXTRACTOR_NAMES
from .extractors.guidance import init_tiny_extractors, install_ram_tagger, tiny_random_ram
from .extractors.ram import RAMConfig
from .families import MEGASR, SEESR, SEESR_TURBO, get_family
from .hub import resolve_weights_source
from .identity import TINY_REASON
from .models.config import CONFIG_NAME, MegaSRConfig, SeeSRConfig, load_model_config
from .models.denoiser import MegaSRDenoiser
from .models.loading import load_denoiser
from .models.presets import get_preset
from .models.seesr import SeeSRDenoiser

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
#: what a diffusers base folder (SD2-base, sd-turbo) must hold to give a SeeSR folder its parts
_BASE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


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
    denoiser = MegaSRDenoiser.from_preset("tiny") if family == MEGASR else SeeSRDenoiser.from_preset("tiny", family=family)
    # Zero-initialized modules would contribute exactly zero; give them small random values so
    # the tiny model exercises every path (documented: these weights are for tests only).
    _randomize_zero_init(denoiser, seed)
    denoiser.config = denoiser.config.replace(extra={**denoiser.config.extra, TINY_MARKER: True})
    denoiser.save_pretrained(directory)
    AutoencoderKL(**preset.vae).save_pretrained(directory / "vae")
    text_config = CLIPTextConfig(**preset.text_encoder)
    CLIPTextModel(text_config).save_pretrained(directory / "text_encoder")
    tokenizer = write_tiny_tokenizer(directory / "tokenizer")
    DDPMScheduler(**{**preset.scheduler, **(TURBO_SCHEDULER if family == SEESR_TURBO else {})}).save_pretrained(directory / "scheduler")
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
            controlnet_output = name.startswith(("controlnet.controlnet_down_blocks.", "controlnet.controlnet_mid_block."))
            if megasr_module or (controlnet_output and denoiser.family != MEGASR):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def default_demo_weights() -> Path:
    """Where the CLI and server keep the tiny demo weights ($MEGASR_HOME, else the user cache)."""
    home = os.environ.get("MEGASR_HOME")
    base = Path(home) if home else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megasr"
    return base / "tiny-demo"


#: The variable that names the weights when no ``--weights`` is given: a folder or a Hub id.
WEIGHTS_ENV = "MEGASR_WEIGHTS"


def resolve_weights(weights: str | Path | None, warn: Callable[[str], None] = lambda message: None) -> Path:
    """The weights folder to load: ``weights``, else ``$MEGASR_WEIGHTS`` (a folder or a Hub id, fetched by
    ``megasr_core.hub.resolve_weights_source``), else the tiny demo weights, written on first use.

    The demo weights are random and untrained: ``warn`` hears that (and when they are being written).
    Raises ``FileNotFoundError`` or ``ValueError`` for a source that does not resolve.
    """
    if weights is None and os.environ.get(WEIGHTS_ENV):
        weights = os.environ[WEIGHTS_ENV]
    if weights is not None:
        return resolve_weights_source(weights)
    demo = default_demo_weights()
    if missing_components(demo):
        warn(f"no --weights or {WEIGHTS_ENV}: writing tiny demo weights to {demo}")
        init_tiny(demo, overwrite=True)
    warn("warning: using the tiny demo weights: they are random and UNTRAINED, so the output is not a "
         f"real super-resolution. Pass --weights or set {WEIGHTS_ENV} for a trained model.")
    return demo


def is_tiny_random(directory: str | Path) -> bool:
    """Whether ``directory`` holds the untrained tiny demo weights (of any family)."""
    try:
        return bool(load_model_config(directory).extra.get(TINY_MARKER))
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


def assemble_seesr(
    seesr_directory: str | Path,
    base_directory: str | Path,
    output: str | Path,
    ram: str | Path,
    dape: str | Path | None = None,
    family: str = SEESR,
    ram_config: RAMConfig | None = None,
) -> Path:
    """Build a SeeSR or SeeSR-Turbo directory from the public releases, as SeeSR's test scripts load them.

    ``seesr_directory`` holds SeeSR's ``unet/`` and ``controlnet/``; ``base_directory`` is a
    diffusers copy of ``stabilityai/stable-diffusion-2-base`` (``seesr``) or of
    ``stabilityai/sd-turbo`` (``seesr-turbo``: its UNet weights, with only the image attentions
    taken from SeeSR's UNet). VAE, text encoder and tokenizer are copied from the base; the
    scheduler is DDPM with the base's settings (sd-turbo's trailing timesteps). RAM's
    ``ram_swin_large_14m.pth`` (+ SeeSR's ``DAPE.pth``, merged) becomes ``extractors/tagger/``.
    """
    if family not in SeeSRConfig.FAMILIES:
        raise ValueError(f"assemble_seesr builds {' or '.join(SeeSRConfig.FAMILIES)}, not {family!r}")
    seesr_directory, base_directory, output = Path(seesr_directory), Path(base_directory), Path(output)
    missing = [c for c in ("unet", "controlnet") if not (seesr_directory / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"{seesr_directory} is not a SeeSR release folder: missing {', '.join(missing)}/")
    missing = [c for c in _BASE_PARTS if not (base_directory / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"{base_directory} is not a diffusers SD2-base / sd-turbo folder: missing {', '.join(missing)}")
    if not Path(ram).is_file():
        raise FileNotFoundError(f"RAM checkpoint {ram} not found")
    if dape is not None and not Path(dape).is_file():
        raise FileNotFoundError(f"DAPE checkpoint {dape} not found")
    config = SeeSRConfig(family=family, preset="sd2-base")
    denoiser = SeeSRDenoiser.from_parts(
        seesr_directory / "unet", seesr_directory / "controlnet", config,
        base_unet_directory=base_directory / "unet" if family == SEESR_TURBO else None,
    )
    output.mkdir(parents=True, exist_ok=True)
    denoiser.save_pretrained(output)
    for component in ("vae", "text_encoder", "tokenizer"):
        shutil.copytree(base_directory / component, output / component, dirs_exist_ok=True)
    DDPMScheduler.from_config(DDPMScheduler.load_config(base_directory / "scheduler")).save_pretrained(output / "scheduler")
    tagger = install_ram_tagger(output / EXTRACTORS_DIR, ram, dape, config=ram_config)
    if tagger.config.embed_width != denoiser.config.image_embed_dim:
        raise ValueError(f"RAM's image embeddings are {tagger.config.embed_width} wide, SeeSR's image attentions "
                         f"take {denoiser.config.image_embed_dim}")
    write_model_index(output)
    return output


def describe(directory: str | Path) -> dict[str, Any]:
    """What a weights directory holds: family, whether it is trained (and what is random),
    config, parameter counts, missing components."""
    directory = Path(directory)
    denoiser = load_denoiser(directory)
    extractors_dir = directory / EXTRACTORS_DIR
    tiny = is_tiny_random(directory)
    reasons = untrained_reasons(directory, denoiser)
    return {
        "directory": str(directory),
        "family": denoiser.family,
        "trained": not reasons,
        "untrained_reasons": reasons,
        "random": ["every weight (tiny preset)"] if tiny else random_parts(denoiser),
        "config": denoiser.config.to_dict(),
        "tiny_random": tiny,
        "missing_components": missing_components(directory),
        "extractors": [n for n in EXTRACTOR_NAMES if (extractors_dir / n).is_dir()],
        "parameters": denoiser.parameter_counts(),
    }


def untrained_reasons(directory: str | Path, denoiser: MegaSRDenoiser | SeeSRDenoiser) -> list[str]:
    """Why a folder's weights cannot super-resolve: the tiny demo marker, else what the loaded
    denoiser's still zero-initialized parts say (empty when trained)."""
    return [TINY_REASON] if is_tiny_random(directory) else denoiser.untrained_reasons()


def random_parts(denoiser: MegaSRDenoiser | SeeSRDenoiser) -> list[str]:
    """The parts of a denoiser that still hold their initialization (untrained), by name."""
    from .models.untrained import CONTROLNET_UNTRAINED

    reasons = denoiser.untrained_reasons()
    parts = []
    if CONTROLNET_UNTRAINED in reasons:
        parts.append("controlnet: a copy of the UNet with zero output convolutions")
    if any(reason.startswith("MegaSR modules") for reason in reasons):
        parts.append("unet and controlnet csm/msfm: zero-initialized MegaSR modules")
    return parts
