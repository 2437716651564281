"""(LR, HR) training pairs from folders of HR photos: random crops degraded on the fly.

Each item is a random ``crop_size`` crop of one HR image, mirrored left-right half of the time,
USM-sharpened (SeeSR's ``use_usm``: the model learns the sharpened HR and the LR is degraded
from it), and its Real-ESRGAN degradation. Crops, flips and degradations are seeded by (seed,
epoch, index), so a run is reproducible and every epoch sees new crops. ``make_pairs`` writes such
pairs to disk once (offline pair-making).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from .degradations import DegradationConfig, degrade
from .sharpen import USMConfig, usm_sharpen

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def list_images(roots: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for root in roots:
        root = Path(root)
        if root.is_file():
            files.append(root)
        elif root.is_dir():
            files += sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            raise FileNotFoundError(f"no such image folder or file: {root}")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {', '.join(map(str, roots))}")
    return files


def random_crop(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A ``size×size`` crop of ``3×H×W``; smaller images are first enlarged (bicubic) to fit."""
    height, width = image.shape[-2:]
    if min(height, width) < size:
        factor = size / min(height, width)
        image = F.interpolate(
            image[None],
            size=(max(size, round(height * factor)), max(size, round(width * factor))),
            mode="bicubic",
            align_corners=False,
        )[0].clamp(0, 1)
        height, width = image.shape[-2:]
    top = int(torch.randint(0, height - size + 1, (), generator=generator))
    left = int(torch.randint(0, width - size + 1, (), generator=generator))
    return image[:, top : top + size, left : left + size]


def random_hflip(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror ``…×H×W`` left-right with probability ½ (basicsr's ``use_hflip`` augmentation)."""
    return image.flip(-1) if float(torch.rand((), generator=generator)) < 0.5 else image


def load_rgb(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class PairedImageDataset(Dataset):
    """Random HR crops and their degraded LR (``{"lr", "hr"}``, in [0, 1]).

    ``hflip``: mirror half of the crops; ``usm``: sharpen the HR before degrading it (None = off,
    e.g. for validation against the true HR).
    """

    def __init__(
        self,
        roots: Sequence[str | Path],
        crop_size: int = 512,
        seed: int = 0,
        degradation: DegradationConfig = DegradationConfig(),
        hflip: bool = True,
        usm: USMConfig | None = USMConfig(),
    ) -> None:
        if crop_size % degradation.scale:
            raise ValueError(f"crop_size {crop_size} must be a multiple of the scale {degradation.scale}")
        self.files = list_images(roots)
        self.crop_size, self.seed, self.degradation = crop_size, seed, degradation
        self.hflip, self.usm = hflip, usm
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) % 2**63)
        hr = random_crop(load_rgb(self.files[index]), self.crop_size, generator)
        if self.hflip:
            hr = random_hflip(hr, generator)
        if self.usm is not None:
            hr = usm_sharpen(hr[None], self.usm)[0]
        lr = degrade(hr[None], self.degradation, generator)[0]
        return {"lr": lr, "hr": hr}


def make_pairs(
    roots: Sequence[str | Path],
    output: str | Path,
    crop_size: int = 512,
    per_image: int = 1,
    seed: int = 0,
    degradation: DegradationConfig = DegradationConfig(),
    hflip: bool = True,
    usm: USMConfig | None = USMConfig(),
) -> int:
    """Write ``output/hr/*.png`` and matching ``output/lr/*.png``; returns the number of pairs."""
    output = Path(output)
    (output / "hr").mkdir(parents=True, exist_ok=True)
    (output / "lr").mkdir(parents=True, exist_ok=True)
    dataset = PairedImageDataset(roots, crop_size=crop_size, seed=seed, degradation=degradation, hflip=hflip, usm=usm)
    count = 0
    for epoch in range(per_image):
        dataset.set_epoch(epoch)
        for index, path in enumerate(dataset.files):
            pair = dataset[index]
            name = f"{path.stem}_{index:05d}_{epoch:03d}.png"
            for kind in ("hr", "lr"):
                array = (pair[kind].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
                Image.fromarray(array).save(output / kind / name)
            count += 1
    return count
