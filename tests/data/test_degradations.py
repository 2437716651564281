"""Real-ESRGAN degradations: seeded, normalized kernels, sizes, and each operator's effect."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from megasr_core.data import DegradationConfig, PairedImageDataset, degrade, jpeg, make_pairs
from megasr_core.data.degradations import (
    StageConfig,
    add_gaussian_noise,
    add_poisson_noise,
    anisotropic_kernel,
    filter2d,
    random_kernel,
    sinc_kernel,
)


def photo(size: int = 256) -> torch.Tensor:
    image = Image.fromarray(data.astronaut()).resize((size, size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def test_fixed_seed_same_lr_other_seed_other_lr():
    hr = photo(128).repeat(2, 1, 1, 1)
    a = degrade(hr, generator=torch.Generator().manual_seed(3))
    b = degrade(hr, generator=torch.Generator().manual_seed(3))
    c = degrade(hr, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, (a * 255).round() / 255)  # 8-bit like a real LR photo


@pytest.mark.parametrize("scale, size", [(4, (512, 384)), (2, (64, 96))])
def test_output_sizes(scale, size):
    hr = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    lr = degrade(hr, DegradationConfig(scale=scale), torch.Generator().manual_seed(0))
    assert lr.shape[-2:] == (size[0] // scale, size[1] // scale)


def test_every_kernel_is_normalized():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        kernel = random_kernel(StageConfig(sinc_prob=0.3), generator)
        assert kernel.shape == (21, 21)
        assert kernel.sum().item() == pytest.approx(1.0, abs=1e-5)
    for shape, beta in (("gaussian", 2.0), ("generalized", 0.7), ("plateau", 1.5)):
        assert anisotropic_kernel(15, 2.0, 0.8, 0.6, beta, shape).sum().item() == pytest.approx(1.0, abs=1e-5)
    assert sinc_kernel(13, math.pi / 3).sum().item() == pytest.approx(1.0, abs=1e-5)


def high_frequency_energy(images: torch.Tensor) -> float:
    laplacian = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    return torch.nn.functional.conv2d(images, laplacian, groups=3).pow(2).mean().item()


def test_blur_lowers_high_frequencies():
    hr = photo()
    blurred = filter2d(hr, anisotropic_kernel(21, 2.5, 2.5, 0.0)[None])
    assert high_frequency_energy(blurred) < 0.2 * high_frequency_energy(hr)
    assert blurred.mean().item() == pytest.approx(hr.mean().item(), abs=0.01)  # normalized: no brightness change


def test_gaussian_noise_has_the_requested_sigma():
    flat = torch.full((2, 3, 128, 128), 0.5)
    noisy = add_gaussian_noise(
        flat, torch.tensor([20.0, 5.0]), torch.tensor([False, True]), torch.Generator().manual_seed(0)
    )
    assert (noisy[0] - flat[0]).std().item() == pytest.approx(20 / 255, rel=0.05)
    gray = noisy[1] - flat[1]
    assert gray.std().item() == pytest.approx(5 / 255, rel=0.05)
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])  # same in every channel


def test_poisson_noise_grows_with_brightness():
    images = torch.cat([torch.full((1, 3, 128, 128), 0.1), torch.full((1, 3, 128, 128), 0.8)])
    noisy = add_poisson_noise(
        images, torch.tensor([1.0, 1.0]), torch.tensor([False, False]), torch.Generator().manual_seed(0)
    )
    dark, bright = (noisy - images).std(dim=(1, 2, 3))
    assert bright > 2 * dark
    assert bright.item() == pytest.approx(math.sqrt(0.8 * 255) / 255, rel=0.1)


def blockiness(images: torch.Tensor) -> float:
    """Mean jump across 8-pixel block borders divided by the mean jump inside blocks."""
    diffs = (images[..., :, 1:] - images[..., :, :-1]).abs().mean(dim=(0, 1, 2))
    border = diffs[7::8].mean()
    inside = torch.cat([diffs[i::8] for i in range(7) if i != 7]).mean()
    return (border / inside).item()


def test_jpeg_introduces_block_artifacts_that_grow_as_quality_drops():
    hr = filter2d(photo(), anisotropic_kernel(9, 1.5, 1.5, 0.0)[None])  # smooth, so blocks show
    low, high = jpeg(hr.repeat(2, 1, 1, 1), torch.tensor([10.0, 95.0]))
    assert blockiness(low[None]) > 1.3 > blockiness(hr)
    assert (low - hr).abs().mean() > (high - hr).abs().mean()
    assert (high - hr).abs().mean() < 0.02


def test_dataset_and_offline_pairs(tmp_path):
    folder = tmp_path / "hr"
    folder.mkdir()
    for name, array in (
        ("astronaut", data.astronaut()),
        ("coffee", data.coffee()),
        ("small", data.astronaut()[:100, :100]),
    ):
        Image.fromarray(array).save(folder / f"{name}.png")
    dataset = PairedImageDataset([folder], crop_size=128, seed=1)
    item = dataset[0]
    assert item["hr"].shape == (3, 128, 128) and item["lr"].shape == (3, 32, 32)
    assert torch.equal(dataset[0]["lr"], item["lr"])  # deterministic
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["hr"], item["hr"])  # new crop each epoch
    assert dataset[2]["hr"].shape == (3, 128, 128)  # a smaller image is enlarged to fit
    count = make_pairs([folder], tmp_path / "pairs", crop_size=64, per_image=2, seed=0)
    assert count == 6
    with Image.open(next((tmp_path / "pairs" / "lr").iterdir())) as lr:
        assert lr.size == (16, 16)
    assert sorted(p.name for p in (tmp_path / "pairs" / "hr").iterdir()) == sorted(
        p.name for p in (tmp_path / "pairs" / "lr").iterdir()
    )
    with pytest.raises(ValueError, match="multiple of the scale"):
        PairedImageDataset([folder], crop_size=130)
