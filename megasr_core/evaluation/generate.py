"""The images to score: each model's outputs (batched, resumable) and the bicubic baseline.

Outputs are named by sample key, written to a temporary name and renamed, so an interrupted run
leaves only complete files and the next run skips exactly those.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..progress import progress_bar
from .pairing import Sample


def output_path(folder: Path, sample: Sample) -> Path:
    return folder / f"{sample.key.replace('/', '_')}.png"


def _save(image: Image.Image, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    image.convert("RGB").save(partial, format="PNG")
    partial.replace(target)


@dataclass
class Generated:
    """One model's outputs and what produced them (the report's column for that model)."""

    samples: list[Sample]  # with ``pred`` set
    resumed: int  # outputs already on disk, skipped
    identity: dict[str, Any]  # ``ModelIdentity.to_dict()``: family, title, weights label, trained
    steps: int  # as sampled: the family's default unless the caller chose
    guidance_scale: float
    sampler: str = "ddpm"
    cfg_interval: tuple[float, float] | None = None


def super_resolve(
    samples: list[Sample],
    folder: Path,
    weights: Path,
    *,
    scale: float = 4,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 1,
    device: str | None = None,
    dtype=None,
    log: Callable[[str], None] = lambda _: None,
    sampler: str = "ddpm",
    cfg_interval: tuple[float, float] | None = None,
) -> Generated:
    """Super-resolve every sample's LR into ``folder`` (skipping outputs already there).

    ``steps``/``guidance_scale`` ``None`` take the weights' family defaults (SeeSR-Turbo: 2 steps,
    no CFG; a fast ``sampler``'s own steps). The model is loaded even when every output exists,
    so the report always states which model and settings made them. Every image gets its own
    generator seeded with ``seed``, so an output does not depend on its batch mates.
    """
    import torch

    from megasr_core.parameters import default_steps
    from megasr_core.pipelines import MegaSRPipeline

    todo = [s for s in samples if not output_path(folder, s).is_file()]
    done = len(samples) - len(todo)
    if done:
        log(f"{done} of {len(samples)} outputs already in {folder}: skipped")
    pipeline = MegaSRPipeline.from_pretrained(weights, torch_dtype=dtype, device=device)
    try:
        identity = pipeline.identity.to_dict()
        defaults = pipeline.family.defaults
        steps = default_steps(sampler, defaults.steps) if steps is None else steps
        guidance_scale = defaults.guidance_scale if guidance_scale is None else guidance_scale
        interval = "" if cfg_interval is None else f" on {cfg_interval[0]:g}-{cfg_interval[1]:g} of the steps"
        log(f"{identity['title']} ({identity['weights']}): {sampler}, {steps} steps, CFG {guidance_scale:g}{interval}")
        bar = progress_bar(len(todo), f"super-resolving ({identity['title']})", "image")
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            result = pipeline(
                [str(s.lr) for s in batch],
                scale=scale,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                seed=seed,
                max_batch_size=batch_size,
                sampler=sampler,
                cfg_interval=cfg_interval,
            )
            for sample, image in zip(batch, result.images):
                _save(image, output_path(folder, sample))
            bar.update(len(batch))
        bar.close()
    finally:
        device_type = pipeline.device.type
        del pipeline  # the next model gets the memory
        if device_type == "cuda":
            torch.cuda.empty_cache()
    outputs = [Sample(s.key, s.lr, s.gt, output_path(folder, s)) for s in samples]
    return Generated(outputs, done, identity, steps, float(guidance_scale), sampler, cfg_interval)


def bicubic(samples: list[Sample], folder: Path, scale: float = 4) -> list[Sample]:
    """Bicubic upscales of the LR images (to the ground truth's size where there is one)."""
    out = []
    for sample in samples:
        target = output_path(folder, sample)
        with Image.open(sample.lr) as lr:
            lr = lr.convert("RGB")
            if sample.gt is not None:
                with Image.open(sample.gt) as gt:
                    size = gt.size
            else:
                size = (round(lr.width * scale), round(lr.height * scale))
            _save(lr.resize(size, Image.Resampling.BICUBIC), target)
        out.append(Sample(sample.key, sample.lr, sample.gt, target))
    return out


def weights_identity(weights: Path) -> dict[str, object]:
    """Path plus a cheap fingerprint: every config file, every safetensors header, and the first and
    last 64 KiB of each tensor file's data (so two trainings of the same shapes differ)."""
    digest = hashlib.sha256()
    total = 0
    for path in sorted(p for p in weights.rglob("*") if p.is_file()):
        rel = path.relative_to(weights).as_posix()
        if path.suffix == ".json":
            digest.update(rel.encode() + b"\0" + path.read_bytes())
        elif path.suffix == ".safetensors":
            size = path.stat().st_size
            total += size
            with path.open("rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                digest.update(rel.encode() + b"\0" + handle.read(header_len) + str(size).encode())
                digest.update(handle.read(1 << 16))
                handle.seek(max(8 + header_len, size - (1 << 16)))
                digest.update(handle.read())
    config = weights / "megasr.json"
    preset = json.loads(config.read_text()).get("preset") if config.is_file() else None
    return {
        "path": str(weights.resolve()),
        "fingerprint_sha256": digest.hexdigest(),
        "safetensors_bytes": total,
        "preset": preset,
    }
