"""Training configuration: dataclasses with documented defaults, read from YAML or TOML files.

Defaults follow the paper (Sec. 4.1) and SeeSR: Adam, lr 2.5e-5, batch 16, 512² crops, empty
prompt half of the time, HR tags as the prompt, flipped and USM-sharpened HR crops. Unknown keys
are an error (a typo must not silently train wrong).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class MegaSRTrainConfig:
    #: MegaSR weights directory to start from (e.g. `megasr weights assemble` output)
    weights: str = ""
    #: folders (or files) of HR training images
    train_data: list[str] = field(default_factory=list)
    #: folders of HR validation images (degraded with a fixed seed); empty = no validation
    val_data: list[str] = field(default_factory=list)
    output_dir: str = "runs/megasr"
    crop_size: int = 512
    batch_size: int = 16
    learning_rate: float = 2.5e-5
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: int = 200_000
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # "no", "fp16" or "bf16"
    gradient_checkpointing: bool = False
    #: exponential moving average of the trainable weights (e.g. 0.9999); None = off
    ema_decay: float | None = None
    empty_prompt_probability: float = 0.5
    #: prompt = tags of the HR crop (no quality suffix: that is for inference); False = always empty
    use_tags: bool = True
    #: mirror half the HR crops (basicsr's use_hflip)
    use_hflip: bool = True
    #: USM-sharpen the HR targets, and degrade the LR from them (Real-ESRGAN/SeeSR use_usm)
    use_usm: bool = True
    checkpoint_every: int = 5000
    checkpoints_to_keep: int = 3
    validate_every: int = 5000
    validation_steps: int = 50
    validation_images: int = 4
    log_every: int = 10
    num_workers: int = 4
    seed: int = 0


def _coerce(cls, data: dict[str, Any]):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
    values = {}
    for key, value in data.items():
        if isinstance(value, list) and known[key].type.startswith("tuple"):
            value = tuple(value)
        values[key] = value
    return cls(**values)


def load_config(path: str | Path, cls=MegaSRTrainConfig, overrides: dict[str, Any] | None = None):
    """Read a ``.yaml``/``.yml``/``.toml``/``.json`` file into ``cls`` (then apply ``overrides``)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif path.suffix == ".toml":
        data = tomllib.loads(text)
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"config {path}: use .yaml, .toml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must hold a mapping")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return _coerce(cls, data)


def save_config(config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
