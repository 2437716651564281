"""Reading, checking and writing weight files, with errors that name every bad key.

Reads the layouts upstream diffusers checkpoints come in (single safetensors, an ``fp16``
variant, sharded safetensors with an index, legacy ``.bin``) and never loads partially: a
missing, unexpected or mis-shaped key is an error listing them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_NAME = "diffusion_pytorch_model"
MEGASR_MODULES_NAME = "megasr_modules.safetensors"
_MAX_LISTED = 12


class WeightsError(ValueError):
    """Weights on disk do not match the model they are loaded into."""


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" … and {more} more" if more > 0 else "")


def check_state_dict(
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    found: Mapping[str, torch.Tensor],
    what: str,
) -> None:
    """Raise :class:`WeightsError` unless ``found`` has exactly the keys and shapes of ``expected``."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        f"{k} (file {tuple(found[k].shape)}, model {tuple(expected[k])})"
        for k in set(expected) & set(found)
        if tuple(found[k].shape) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} with the wrong shape: {_listing(mismatched)}")
    if problems:
        raise WeightsError(f"{what}: " + "; ".join(problems))


def find_weights_file(directory: Path, name: str = WEIGHTS_NAME) -> list[Path]:
    """Files holding a diffusers model's weights in ``directory``, in the order diffusers prefers."""
    candidates = [
        [directory / f"{name}.safetensors"],
        None,  # sharded safetensors
        [directory / f"{name}.fp16.safetensors"],
        [directory / f"{name}.bin"],
        [directory / f"{name}.fp16.bin"],
    ]
    for entry in candidates:
        if entry is None:
            index = directory / f"{name}.safetensors.index.json"
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                return [directory / shard for shard in sorted(set(weight_map.values()))]
            continue
        if entry[0].is_file():
            return entry
    raise FileNotFoundError(
        f"no weights in {directory}: expected {name}.safetensors (or a sharded index, an fp16 variant or a .bin file)"
    )


def read_weights(paths: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        if path.suffix == ".safetensors":
            part = load_file(str(path))
        else:
            part = torch.load(path, map_location="cpu", weights_only=True)
        duplicated = sorted(set(part) & set(state))
        if duplicated:
            raise WeightsError(f"{path}: keys repeated across shards: {_listing(duplicated)}")
        state.update(part)
    return state


def read_model_dir(directory: Path) -> dict[str, torch.Tensor]:
    return read_weights(find_weights_file(directory))


def write_safetensors(path: Path, state: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path), metadata=metadata)


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_assign(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Strictly load ``state`` into a (possibly meta-device) module, taking over its tensors."""
    expected = module.state_dict()
    check_state_dict({k: v.shape for k, v in expected.items()}, state, what)
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    module.load_state_dict(state, strict=True, assign=True)
    for name, param in module.named_parameters():
        param.requires_grad_(flags.get(name, True))
    leftovers = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if leftovers:
        raise WeightsError(f"{what}: tensors left uninitialized: {', '.join(leftovers[:12])}")
