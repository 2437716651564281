"""Tiny copies of the public releases a user assembles SeeSR from, in their upstream layouts.

* an SD2-base folder (diffusers: ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, a PNDM
  ``scheduler/`` as stabilityai/stable-diffusion-2-base ships it);
* an sd-turbo folder (other UNet weights, sd-turbo's Euler scheduler with trailing timesteps);
* SeeSR's release (``tests.models.seesr_release``), RAM's ``.pth`` and DAPE's LoRA
  (``tests.extractors.test_ram``) with the tiny RAM's config as ``--ram-config`` JSON.

Random weights throughout: enough to run every code path of assembly, loading and serving.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler
from transformers import CLIPTextConfig, CLIPTextModel

from megasr_core.extractors import RAMConfig
from megasr_core.models import get_preset
from megasr_core.weights.tiny import write_tiny_tokenizer
from tests.extractors.ram_layout import dape_checkpoint, ram_checkpoint
from tests.models.seesr_release import tiny_networks, write_seesr_release

TINY = get_preset("tiny")


@dataclass(frozen=True)
class Releases:
    sd2: Path
    sd_turbo: Path
    seesr: Path
    ram: Path
    dape: Path
    ram_config: Path


def _write_base(directory: Path, seed: int, scheduler) -> Path:
    torch.manual_seed(seed)
    unet, _ = tiny_networks(seed)
    unet.save_pretrained(directory / "unet")
    AutoencoderKL(**TINY.vae).save_pretrained(directory / "vae")
    CLIPTextModel(CLIPTextConfig(**TINY.text_encoder)).save_pretrained(directory / "text_encoder")
    write_tiny_tokenizer(directory / "tokenizer")
    scheduler.save_pretrained(directory / "scheduler")
    config_file = directory / "scheduler" / "scheduler_config.json"  # as the Hub's files say it
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "clip_sample": False}, indent=2))
    return directory


def write_releases(root: Path, seed: int = 0) -> Releases:
    """Every upstream part under ``root``; SeeSR's UNet holds SD2-base's weights plus its image attentions."""
    schedule = {
        k: TINY.scheduler[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "steps_offset")
    }
    sd2 = _write_base(root / "stable-diffusion-2-base", seed, PNDMScheduler(**schedule, skip_prk_steps=True))
    sd_turbo = _write_base(
        root / "sd-turbo",
        seed + 10,
        EulerDiscreteScheduler(**schedule, timestep_spacing="trailing", prediction_type="epsilon"),
    )
    from diffusers import UNet2DConditionModel

    seesr = write_seesr_release(root / "seesr", seed=seed, unet=UNet2DConditionModel.from_pretrained(sd2 / "unet"))
    config = RAMConfig.tiny()
    torch.save(ram_checkpoint(config, seed=seed), root / "ram_swin_large_14m.pth")
    torch.save(dape_checkpoint(config, seed=seed + 1), root / "DAPE.pth")
    (root / "ram_config.json").write_text(json.dumps(dataclasses.asdict(config)))
    return Releases(sd2, sd_turbo, seesr, root / "ram_swin_large_14m.pth", root / "DAPE.pth", root / "ram_config.json")
