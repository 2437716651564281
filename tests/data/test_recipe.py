"""SeeSR's training-data recipe, each piece against its formula recomputed here (issue 11).

basicsr's kernels (q = xᵀΣ⁻¹x): Gaussian exp(−q/2), generalized exp(−q^β/2), plateau
1/(1 + q^β); kernel sides odd 7..21 in both stages; USM sharpening of the HR
(OpenCV Gaussian blur 51×51, σ 8, weight 0.5, threshold 10/255, soft mask); horizontal flips.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from megasr_core.data import DegradationConfig, PairedImageDataset, USMConfig, anisotropic_kernel, usm_sharpen
from megasr_core.data.degradations import random_kernel_size


def quadratic_form(x: float, y: float, sigma_x: float, sigma_y: float, theta: float) -> float:
    """q = xᵀΣ⁻¹x with Σ = R(θ)·diag(σx², σy²)·R(θ)ᵀ: rotate the point back, then scale each axis."""
    u = math.cos(theta) * x + math.sin(theta) * y
    v = -math.sin(theta) * x + math.cos(theta) * y
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


FORMULAS = {
    "gaussian": lambda q, beta: math.exp(-0.5 * q),
    "generalized": lambda q, beta: math.exp(-0.5 * q**beta),
    "plateau": lambda q, beta: 1.0 / (1.0 + q**beta),
}


@pytest.mark.parametrize(
    "shape, beta", [("gaussian", 1.0), ("generalized", 0.6), ("generalized", 3.5), ("plateau", 1.7)]
)
def test_kernel_values_follow_basicsr_formulas(shape, beta):
    size, sx, sy, theta = 9, 2.2, 0.9, 0.7
    kernel = anisotropic_kernel(size, sx, sy, theta, beta, shape).double()
    half = size // 2
    center = kernel[half, half].item()  # q = 0 there, so every formula gives 1 before normalizing
    for row, col in [(half, half + 1), (half + 2, half - 1), (0, size - 1), (half - 3, half + 2)]:
        q = quadratic_form(col - half, row - half, sx, sy, theta)
        assert q > 0 and abs(q - 1) > 0.05  # points where q^β and q^(β/2) differ
        assert kernel[row, col].item() / center == pytest.approx(FORMULAS[shape](q, beta), rel=1e-5)
    if shape == "generalized":  # teeth: the old exponent β/2 gives clearly different values
        q = quadratic_form(1, 0, sx, sy, theta)
        assert abs(math.exp(-0.5 * q ** (beta / 2)) - kernel[half, half + 1].item() / center) > 1e-2


def test_generalized_kernel_with_beta_one_is_the_gaussian():
    torch.testing.assert_close(
        anisotropic_kernel(11, 1.8, 1.1, 0.3, 1.0, "generalized"),
        anisotropic_kernel(11, 1.8, 1.1, 0.3, 1.0, "gaussian"),
    )


@pytest.mark.parametrize("stage", ["first", "second"])
def test_kernel_sizes_are_odd_7_to_21_in_both_stages(stage):
    config = getattr(DegradationConfig(), stage)
    generator = torch.Generator().manual_seed(0)
    sizes = [random_kernel_size(config, generator) for _ in range(400)]
    assert set(sizes) == set(range(7, 22, 2))
    counts = np.bincount(sizes)[7::2]
    assert counts.min() > 400 / 8 / 2  # roughly uniform over the eight sizes


# ---------------------------------------------------------------- USM
def opencv_gaussian(size: int, sigma: float) -> np.ndarray:
    """getGaussianKernel(size, sigma): normalized exp(−x²/2σ²), x centred on 0."""
    x = np.arange(size) - (size - 1) / 2
    line = np.exp(-(x**2) / (2 * sigma**2))
    return line / line.sum()


def blur(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate each channel of C×H×W with ``kernel`` after reflect padding (basicsr's filter2D)."""
    pad = kernel.shape[0] // 2
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape, axis=(1, 2))
    return np.einsum("chwij,ij->chw", windows, kernel)


def reference_usm(image: np.ndarray, weight: float = 0.5, radius: int = 50, threshold: float = 10) -> np.ndarray:
    size = radius + 1 if radius % 2 == 0 else radius
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8  # OpenCV's σ for σ = 0: 8.0 at 51 taps
    kernel = np.outer(opencv_gaussian(size, sigma), opencv_gaussian(size, sigma))
    residual = image - blur(image, kernel)
    soft_mask = blur((np.abs(residual) * 255 > threshold).astype(np.float64), kernel)
    sharp = np.clip(image + weight * residual, 0, 1)
    return soft_mask * sharp + (1 - soft_mask) * image


def test_usm_matches_basicsr_formula_on_a_photo():
    image = np.asarray(data.astronaut()[100:140, 180:224], dtype=np.float64).transpose(2, 0, 1) / 255.0
    ours = usm_sharpen(torch.from_numpy(image)[None], USMConfig())[0].numpy()
    expected = reference_usm(image)
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    assert np.abs(ours - image).max() > 0.02  # it does sharpen
    assert USMConfig() == USMConfig(radius=50, sigma=0.0, weight=0.5, threshold=10.0)


def test_usm_leaves_flat_images_alone_and_follows_its_weight():
    flat = torch.full((1, 3, 32, 32), 0.4, dtype=torch.float64)
    torch.testing.assert_close(usm_sharpen(flat), flat)
    image = np.asarray(data.camera()[200:236, 200:236], dtype=np.float64)[None].repeat(3, 0) / 255.0
    strong = usm_sharpen(torch.from_numpy(image)[None], USMConfig(weight=1.0, radius=8, threshold=4))[0].numpy()
    np.testing.assert_allclose(strong, reference_usm(image, weight=1.0, radius=8, threshold=4), atol=1e-6)


# ---------------------------------------------------------------- flips and the dataset
@pytest.fixture(scope="module")
def hr_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hr")
    Image.fromarray(data.astronaut()).save(folder / "astronaut.png")
    return folder


def test_dataset_flips_half_the_crops_seeded(hr_folder):
    files = [hr_folder / "astronaut.png"] * 16
    plain = PairedImageDataset(files, crop_size=32, seed=3, hflip=False, usm=None)
    flipped = PairedImageDataset(files, crop_size=32, seed=3, hflip=True, usm=None)
    outcomes = []
    for index in range(len(files)):
        a, b = plain[index]["hr"], flipped[index]["hr"]
        assert torch.equal(b, a) or torch.equal(b, a.flip(-1))  # same crop, maybe mirrored
        outcomes.append(not torch.equal(b, a))
        assert torch.equal(flipped[index]["hr"], b)  # seeded: the same item again
    assert 3 <= sum(outcomes) <= 13


def test_dataset_sharpens_the_hr_by_default_and_degrades_the_sharpened_hr(hr_folder):
    files = [hr_folder / "astronaut.png"]
    plain = PairedImageDataset(files, crop_size=64, seed=0, hflip=False, usm=None)[0]
    default = PairedImageDataset(files, crop_size=64, seed=0, hflip=False)[0]
    torch.testing.assert_close(default["hr"], usm_sharpen(plain["hr"][None])[0])
    assert not torch.equal(default["lr"], plain["lr"])  # the LR comes from the sharpened HR


@pytest.mark.parametrize("flags, hflip, usm", [([], True, USMConfig()), (["--no-usm", "--no-hflip"], False, None)])
def test_cli_make_pairs_writes_the_dataset_items(hr_folder, tmp_path, flags, hflip, usm):
    from typer.testing import CliRunner

    from megasr_core.cli import app

    result = CliRunner().invoke(
        app, ["data", "make-pairs", str(hr_folder), "-o", str(tmp_path), "--crop-size", "64", *flags]
    )
    assert result.exit_code == 0, result.output
    item = PairedImageDataset([hr_folder], crop_size=64, seed=0, hflip=hflip, usm=usm)[0]
    for kind in ("hr", "lr"):
        (path,) = (tmp_path / kind).iterdir()
        written = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255).permute(2, 0, 1)
        assert (written - item[kind]).abs().max() <= 0.5 / 255 + 1e-6
