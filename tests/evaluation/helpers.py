"""Helpers of the evaluation tests: degradations of real photos, compact random weight files."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter


def crop(photo: np.ndarray, top: int, left: int, size: int = 128) -> Image.Image:
    return Image.fromarray(photo[top : top + size, left : left + size])


def blurred(image: Image.Image, radius: float = 1.2) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius))


def noisy(image: Image.Image, sigma: float = 10.0, seed: int = 0) -> Image.Image:
    array = np.asarray(image, dtype=np.float64)
    array = array + np.random.default_rng(seed).normal(0, sigma, array.shape)
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int = 20) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def compact_random(state_dict: dict[str, torch.Tensor], seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random tensors of the exact shapes of ``state_dict`` that take almost no disk: one random
    value per output row, broadcast (stride 0) over the rest. ``torch.save`` stores only the small
    storage; ``load_state_dict`` copies them into full-size parameters. Keeps a 528 MB VGG16 file
    at a few kB while its keys and shapes stay those of the real checkpoint."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state_dict.items():
        shape = tuple(value.shape)
        if not value.is_floating_point():
            out[key] = torch.zeros(shape, dtype=value.dtype)
            continue
        if not shape:
            out[key] = torch.randn((), generator=generator) * std
            continue
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        # Constant along a row, a weight sums its inputs: 1/fan_in keeps activations at their scale.
        rows = torch.randn((shape[0],) + (1,) * (len(shape) - 1), generator=generator) * (
            std if fan_in == 1 else 1.0 / fan_in
        )
        if key.endswith("running_var"):
            rows = rows.abs() + 1.0  # a variance: positive
        elif (
            key.endswith(("norm.weight", "ln.weight", "gn_root.weight", "bn1.weight", "bn2.weight", "bn3.weight"))
            or "ln_" in key
        ):
            rows = rows + 1.0  # normalization gains near 1 keep deep random networks finite
        out[key] = rows.expand(shape)
    return out


def save_compact(module_or_state: torch.nn.Module | dict, path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write ``compact_random`` weights of a module (or state dict, e.g. built on the meta device) to ``path``."""
    state = module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state
    weights = compact_random(state, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights, path)
    return weights


class _Holder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_compact_torchscript(state_dict: dict[str, torch.Tensor], path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """``compact_random`` weights as a TorchScript archive whose ``state_dict()`` has ``state_dict``'s keys
    (OpenAI's CLIP files are TorchScript; loaders read only their state dict)."""
    weights = compact_random(state_dict, seed)
    root = _Holder()
    for key, value in weights.items():
        *parents, leaf = key.split(".")
        module = root
        for part in parents:
            if part not in module._modules:
                module.add_module(part, _Holder())
            module = module._modules[part]
        module.register_buffer(leaf, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(root), str(path))
    return weights
