"""Assembly of a weights directory from local copies of public releases; nothing here downloads.

``assemble_from_sd2`` turns a local copy of ``stabilityai/stable-diffusion-2-base`` (plus an
optional trained overlay) into a MegaSR directory; ``assemble_seesr`` turns SeeSR's release (its
``unet/`` and ``controlnet/``), SD2-base or sd-turbo and RAM (+ DAPE) into a SeeSR or SeeSR-Turbo
directory.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from ..extractors.guidance import install_ram_tagger
from ..extractors.ram import RAMConfig
from ..families import SEESR, SEESR_TURBO
from ..models.config import MegaSRConfig, SeeSRConfig
from ..models.denoiser import MegaSRDenoiser
from ..models.seesr import SeeSRDenoiser
from ..progress import stage_bar
from .layout import EXTRACTORS_DIR, write_model_index

#: what a diffusers base folder (SD2-base, sd-turbo) must hold to give a SeeSR folder its parts
_BASE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


#: the stages every assembly has (a bar's names); each adds its own after them
_STAGES = ("building the denoiser", "writing the denoiser", "copying VAE, text encoder, tokenizer", "scheduler")


def _write_with_base_parts(denoiser, base_directory: Path, output: Path, done: Callable[[], None]) -> None:
    """The stages after the denoiser is built: it is written to ``output``, the base's VAE, text
    encoder and tokenizer are copied as they are, and its scheduler becomes DDPM with the same
    noise schedule (and timestep spacing)."""
    output.mkdir(parents=True, exist_ok=True)
    denoiser.save_pretrained(output)
    done()
    for component in ("vae", "text_encoder", "tokenizer"):
        shutil.copytree(base_directory / component, output / component, dirs_exist_ok=True)
    done()
    DDPMScheduler.from_config(DDPMScheduler.load_config(base_directory / "scheduler")).save_pretrained(
        output / "scheduler"
    )
    done()


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
    with stage_bar([*_STAGES, *(["extractors"] if extractors is not None else [])], "assembling MegaSR") as done:
        denoiser = MegaSRDenoiser.from_unet_pretrained(sd2_directory / "unet", config=config, overlay=overlay)
        done()
        _write_with_base_parts(denoiser, sd2_directory, output, done)
        if extractors is not None:
            shutil.copytree(Path(extractors), output / EXTRACTORS_DIR, dirs_exist_ok=True)
            settle_clip_token_space(output / EXTRACTORS_DIR / "clip", denoiser.config.image_embed_dim)
            done()
    write_model_index(output)
    return output


def settle_clip_token_space(clip_directory: Path, image_embed_dim: int) -> str | None:
    """Record which CLIP tokens the CSM takes (``tokens.json``) in an upstream CLIP folder.

    An upstream folder has no ``tokens.json``; the connector width says which space fits:
    CLIP's projection width → projected tokens, the vision tower's width → hidden states.
    """
    from ..extractors.clip_image import TOKENS_FILE

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
            f"{clip_directory}: CLIP gives {vision.get('hidden_size')}-wide hidden or "
            f"{config.get('projection_dim')}-wide "
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
        raise FileNotFoundError(
            f"{base_directory} is not a diffusers SD2-base / sd-turbo folder: missing {', '.join(missing)}"
        )
    if not Path(ram).is_file():
        raise FileNotFoundError(f"RAM checkpoint {ram} not found")
    if dape is not None and not Path(dape).is_file():
        raise FileNotFoundError(f"DAPE checkpoint {dape} not found")
    config = SeeSRConfig(family=family, preset="sd2-base")
    with stage_bar([*_STAGES, "RAM tagger"], f"assembling {family}") as done:
        denoiser = SeeSRDenoiser.from_parts(
            seesr_directory / "unet",
            seesr_directory / "controlnet",
            config,
            base_unet_directory=base_directory / "unet" if family == SEESR_TURBO else None,
        )
        done()
        _write_with_base_parts(denoiser, base_directory, output, done)
        tagger = install_ram_tagger(output / EXTRACTORS_DIR, ram, dape, config=ram_config)
        done()
    if tagger.config.embed_width != denoiser.config.image_embed_dim:
        raise ValueError(
            f"RAM's image embeddings are {tagger.config.embed_width} wide, SeeSR's image attentions "
            f"take {denoiser.config.image_embed_dim}"
        )
    write_model_index(output)
    return output
