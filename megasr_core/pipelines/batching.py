"""Batching for one pipeline call: images that share a size bucket run as one model batch.

Each image keeps its own random generator, so it comes out the same alone or with batch mates.
Padding sits bottom/right, so cropping gives each image back. An image cancelled mid-run leaves
its batch (its rows are dropped from every tensor) while the others go on. Where static shapes
pay (CUDA graphs, compile), a batch is filled up to the next of :data:`BATCH_BUCKETS` with
padding rows, copies of its last image that draw from generators of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .image_processing import PreparedImage

#: (target, work, bucket) as (height, width) for an LR image of (width, height) at a scale
Geometry = Callable[[tuple[int, int], float], tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]


@dataclass(frozen=True)
class BatchItem:
    """One image of a batch and its output geometry."""

    index: int  # position in the caller's list
    lr: torch.Tensor  # 3×h×w in [0, 1]
    target: tuple[int, int]  # output (height, width) = round(h·s), round(w·s)
    work: tuple[int, int]  # size the model works at (≥ target by SeeSR's small-input rule)
    padding: bool = False  # a copy of a batch mate that fills the batch to a static size (no output)


@dataclass(frozen=True)
class Batch:
    """Images that share a size bucket run together: each is padded to ``padded``, then cropped back."""

    items: list[BatchItem]
    padded: tuple[int, int]  # the bucket: every item's work size padded to the model's multiple


def group_by_bucket(
    prepared: list[PreparedImage], scales: list[float], geometry: Geometry, max_batch_size: int | None
) -> list[Batch]:
    """Group images by size bucket (first-seen order), at most ``max_batch_size`` per batch."""
    groups: dict[tuple[int, int], list[BatchItem]] = {}
    for index, (image, scale) in enumerate(zip(prepared, scales)):
        target, work, bucket = geometry(image.size, scale)
        groups.setdefault(bucket, []).append(BatchItem(index=index, lr=image.rgb, target=target, work=work))
    limit = max_batch_size or len(prepared)
    return [
        Batch(items=items[start : start + limit], padded=bucket)
        for bucket, items in groups.items()
        for start in range(0, len(items), limit)
    ]


#: model batch sizes a batch is padded to when static shapes pay (CUDA graphs, compile)
BATCH_BUCKETS = (1, 2, 4, 8, 16)


def padded_batch_size(count: int, buckets: tuple[int, ...] | None, limit: int | None) -> int:
    """The batch size ``count`` images run at: the smallest bucket that holds them, never above
    ``limit`` (the caller's ``max_batch_size``) unless ``count`` is; ``count`` without buckets."""
    if not buckets:
        return count
    size = next((bucket for bucket in sorted(buckets) if bucket >= count), count)
    return max(count, min(size, limit)) if limit is not None else size


def extractor_groups(items: list[BatchItem]) -> dict[tuple[tuple[int, ...], tuple[int, int]], list[int]]:
    """Rows of ``items`` that share an LR and a working size (one extractor batch each, first-seen order)."""
    groups: dict[tuple[tuple[int, ...], tuple[int, int]], list[int]] = {}
    for row, item in enumerate(items):
        groups.setdefault((tuple(item.lr.shape), item.work), []).append(row)
    return groups


def per_image(name: str, value: Any, count: int) -> list[Any]:
    """``value`` for each of ``count`` images: a single value is shared, a list must match."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} values for {count} images; give one value or one per image")
        return list(value)
    return [value] * count


def image_generators(generator: Any, seed: Any, count: int) -> list[torch.Generator]:
    """One CPU generator per image (several entries may be the same shared generator)."""
    if generator is not None:
        if isinstance(generator, torch.Generator):
            return [generator] * count
        return per_image("generator", generator, count)
    if seed is None:
        seed = int(torch.seed() % 2**63)
    seeds = per_image("seed", seed, count)
    for value in seeds:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            raise ValueError(f"seed must be an integer from 0 to 2^63-1, got {value!r}")
    return [torch.Generator(device="cpu").manual_seed(value) for value in seeds]


def randn_per_image(shape: torch.Size | tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """Standard normal noise of ``shape`` (float32, CPU), row ``i`` drawn from ``generators[i]``."""
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generators])


def pad_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pad bottom/right to ``size``: reflect where the image is large enough, else replicate."""
    pad_h, pad_w = size[0] - image.shape[-2], size[1] - image.shape[-1]
    if pad_h == 0 and pad_w == 0:
        return image
    mode = "reflect" if pad_h < image.shape[-2] and pad_w < image.shape[-1] else "replicate"
    return F.pad(image, (0, pad_w, 0, pad_h), mode=mode)


@dataclass
class RunningBatch:
    """What one batch carries from step to step of the sampler, one row per image still running.

    ``conditionings`` caches the denoiser's conditioning per group of tiles (see the pipeline's
    denoising step); it is cleared whenever rows leave, and the sampler drops their rows too.
    """

    items: list[BatchItem]
    generators: list[torch.Generator]
    control: torch.Tensor  # bicubic ×scale LR padded to the bucket: ControlNet condition, colour reference
    guidance: dict[str, torch.Tensor]
    image_tokens: torch.Tensor | None
    prompts: list[str] = field(default_factory=list)
    positive: torch.Tensor | None = None  # text tokens of ``prompts``
    negative: torch.Tensor | None = None  # text tokens of the negative prompt (with CFG only)
    latents: torch.Tensor | None = None
    conditionings: dict[Any, Any] = field(default_factory=dict)
    sampler: Any = None  # the batch's ``samplers.Sampler`` (its per-row noise and solver state)

    def drop_cancelled(self, is_cancelled: Callable[[int], bool] | None) -> list[int]:
        """Drop the rows of images ``is_cancelled`` names; returns their input indices."""
        if is_cancelled is None:
            return []
        keep = [row for row, item in enumerate(self.items) if item.padding or not is_cancelled(item.index)]
        if len(keep) == len(self.items):
            return []
        dropped = [item.index for row, item in enumerate(self.items) if row not in keep]
        if any(not self.items[row].padding for row in keep):
            self._keep(keep)
        else:  # only padding left: nothing to run for
            self.items = []
        return dropped

    def pad_to(self, size: int) -> None:
        """Fill the batch to ``size`` rows with copies of its last image (marked ``padding``), each
        with a generator of its own, so no image's random draws change."""
        extra = size - len(self.items)
        if extra <= 0:
            return
        assert self.positive is not None

        def grow(tensor: torch.Tensor) -> torch.Tensor:
            return torch.cat([tensor, tensor[-1:].expand(extra, *tensor.shape[1:])])

        last = self.items[-1]
        self.items += [BatchItem(last.index, last.lr, last.target, last.work, padding=True) for _ in range(extra)]
        self.generators += [torch.Generator().manual_seed(row) for row in range(extra)]
        self.prompts += [self.prompts[-1]] * extra
        self.control, self.positive = grow(self.control), grow(self.positive)
        self.negative = grow(self.negative) if self.negative is not None else None
        self.image_tokens = grow(self.image_tokens) if self.image_tokens is not None else None
        self.guidance = {key: grow(value) for key, value in self.guidance.items()}

    def _keep(self, keep: list[int]) -> None:
        assert self.latents is not None and self.positive is not None
        rows = torch.tensor(keep, device=self.latents.device)
        self.items = [self.items[r] for r in keep]
        self.generators = [self.generators[r] for r in keep]
        self.prompts = [self.prompts[r] for r in keep]
        self.latents, self.control, self.positive = self.latents[rows], self.control[rows], self.positive[rows]
        self.negative = self.negative[rows] if self.negative is not None else None
        self.image_tokens = self.image_tokens[rows] if self.image_tokens is not None else None
        self.guidance = {key: value[rows] for key, value in self.guidance.items()}
        self.conditionings.clear()
        if self.sampler is not None:
            self.sampler.keep_rows(keep)
