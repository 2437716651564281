"""Real-ESRGAN's second-order degradation, on torch tensors (batched, on any device, seeded).

HR ``B×3×H×W`` in [0, 1] → LR ``B×3×(H/s)×(W/s)``: blur → resize → noise → JPEG, twice, then
a final sinc filter and resize (in random order with the last JPEG). Every random choice is
drawn from one ``torch.Generator`` per call, so a seed fixes the LR exactly. The values are
SeeSR's (``DegradationConfig`` defaults, REFERENCE.md). JPEG is a real block-DCT codec in torch
(YCbCr, 4:2:0, 8×8 DCT, the standard quantization tables at the drawn quality), so it runs on
the GPU too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


@dataclass(frozen=True)
class StageConfig:
    kernel_size: int = 21
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag: tuple[float, float] = (0.5, 4.0)
    betap: tuple[float, float] = (1.0, 2.0)
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)


@dataclass(frozen=True)
class DegradationConfig:
    scale: int = 4
    first: StageConfig = field(default_factory=StageConfig)
    second_blur_prob: float = 0.8
    # basicsr draws the second kernel's size from the same odd 7..21 range as the first
    # (it ignores ``blur_kernel_size2``), so the second stage keeps ``kernel_size`` 21.
    second: StageConfig = field(
        default_factory=lambda: StageConfig(
            blur_sigma=(0.2, 1.5),
            resize_probs=(0.3, 0.4, 0.3),
            resize_range=(0.3, 1.2),
            noise_range=(1.0, 25.0),
            poisson_scale_range=(0.05, 2.5),
        )
    )
    final_sinc_prob: float = 0.8


# ---------------------------------------------------------------------------- random helpers
def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _choice(generator: torch.Generator, probs: tuple[float, ...]) -> int:
    return int(torch.multinomial(torch.tensor(probs, dtype=torch.float64), 1, generator=generator))


# ---------------------------------------------------------------------------- kernels
def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    half = (size - 1) / 2
    axis = torch.arange(size, dtype=torch.float64) - half
    return torch.meshgrid(axis, axis, indexing="ij")


def anisotropic_kernel(
    size: int, sigma_x: float, sigma_y: float, theta: float, beta: float = 1.0, shape: str = "gaussian"
) -> torch.Tensor:
    """Normalized kernel on a ``size×size`` grid centred on 0, with q = xᵀΣ⁻¹x (basicsr's forms).

    ``shape``: "gaussian" exp(-½ q) (``beta`` unused), "generalized" exp(-½ q^β) (β from
    ``betag``, so β = 1 is the Gaussian) or "plateau" 1 / (1 + q^β) (β from ``betap``).
    """
    rotation = torch.tensor(
        [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64
    )
    covariance = rotation @ torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64)) @ rotation.T
    inverse = torch.linalg.inv(covariance)
    yy, xx = _grid(size)
    points = torch.stack([xx, yy], dim=-1)
    quad = torch.einsum("...i,ij,...j->...", points, inverse, points)
    if shape == "plateau":
        kernel = 1.0 / (quad**beta + 1.0)
    elif shape == "generalized":
        kernel = torch.exp(-0.5 * quad**beta)
    elif shape == "gaussian":
        kernel = torch.exp(-0.5 * quad)
    else:
        raise ValueError(f"shape must be gaussian, generalized or plateau, got {shape!r}")
    return (kernel / kernel.sum()).float()


def sinc_kernel(size: int, cutoff: float) -> torch.Tensor:
    """Circular low-pass (2-D sinc) with cutoff ``cutoff`` rad/pixel, normalized."""
    yy, xx = _grid(size)
    radius = torch.sqrt(xx**2 + yy**2)
    safe = torch.where(radius == 0, torch.ones_like(radius), radius)
    kernel = cutoff * torch.special.bessel_j1(cutoff * safe) / (2 * math.pi * safe)
    kernel = torch.where(radius == 0, torch.full_like(radius, cutoff**2 / (4 * math.pi)), kernel)
    return (kernel / kernel.sum()).float()


def random_kernel_size(stage: StageConfig, generator: torch.Generator) -> int:
    """An odd side uniform over 7, 9, …, ``stage.kernel_size`` (basicsr: 7..21 in both stages)."""
    return 2 * int(torch.randint(3, stage.kernel_size // 2 + 1, (), generator=generator)) + 1


def random_kernel(stage: StageConfig, generator: torch.Generator) -> torch.Tensor:
    """A blur kernel of one of Real-ESRGAN's types, or a sinc kernel, padded to the stage size."""
    size = random_kernel_size(stage, generator)
    if float(torch.rand((), generator=generator)) < stage.sinc_prob:
        cutoff = _uniform(generator, math.pi / 3, math.pi) if size < 13 else _uniform(generator, math.pi / 5, math.pi)
        kernel = sinc_kernel(size, cutoff)
    else:
        kind = KERNEL_TYPES[_choice(generator, stage.kernel_probs)]
        sigma_x = _uniform(generator, *stage.blur_sigma)
        isotropic = kind.endswith("iso") and not kind.endswith("aniso")
        sigma_y = sigma_x if isotropic else _uniform(generator, *stage.blur_sigma)
        theta = 0.0 if isotropic else _uniform(generator, -math.pi, math.pi)
        if kind.startswith("generalized"):
            beta, shape = _uniform(generator, *stage.betag), "generalized"
        elif kind.startswith("plateau"):
            beta, shape = _uniform(generator, *stage.betap), "plateau"
        else:
            beta, shape = 1.0, "gaussian"
        kernel = anisotropic_kernel(size, sigma_x, sigma_y, theta, beta, shape)
    pad = (stage.kernel_size - size) // 2
    return F.pad(kernel, (pad, pad, pad, pad))


def filter2d(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve each image with its own kernel (``B×k×k``), reflect-padded."""
    batch, channels, height, width = images.shape
    size = kernels.shape[-1]
    padded = F.pad(images, (size // 2,) * 4, mode="reflect" if min(height, width) > size // 2 else "replicate")
    weight = kernels.to(images).repeat_interleave(channels, dim=0).unsqueeze(1)
    out = F.conv2d(padded.reshape(1, batch * channels, *padded.shape[-2:]), weight, groups=batch * channels)
    return out.reshape(batch, channels, height, width)


# ---------------------------------------------------------------------------- noise
def add_gaussian_noise(
    images: torch.Tensor, sigma: torch.Tensor, gray: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """σ in 0-255 units per image; gray noise is the same in every channel."""
    noise = torch.randn(images.shape, generator=generator).to(images)
    gray_noise = torch.randn((images.shape[0], 1, *images.shape[-2:]), generator=generator).to(images)
    mixed = torch.where(gray.view(-1, 1, 1, 1).to(images.device), gray_noise.expand_as(noise), noise)
    return images + mixed * (sigma.view(-1, 1, 1, 1).to(images) / 255.0)


def add_poisson_noise(
    images: torch.Tensor, scale: torch.Tensor, gray: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Shot noise at 8-bit levels, scaled by ``scale`` per image (gray: on the luminance)."""
    levels = 255.0
    clean = images.clamp(0, 1)
    color_noise = torch.poisson((clean * levels).cpu(), generator=generator).to(images) / levels - clean
    luminance = 0.299 * clean[:, :1] + 0.587 * clean[:, 1:2] + 0.114 * clean[:, 2:3]
    gray_noise = torch.poisson((luminance * levels).cpu(), generator=generator).to(images) / levels - luminance
    noise = torch.where(gray.view(-1, 1, 1, 1).to(images.device), gray_noise.expand_as(color_noise), color_noise)
    return images + noise * scale.view(-1, 1, 1, 1).to(images)


# ---------------------------------------------------------------------------- JPEG
_LUMA_Q = torch.tensor(
    [
        16,
        11,
        10,
        16,
        24,
        40,
        51,
        61,
        12,
        12,
        14,
        19,
        26,
        58,
        60,
        55,
        14,
        13,
        16,
        24,
        40,
        57,
        69,
        56,
        14,
        17,
        22,
        29,
        51,
        87,
        80,
        62,
        18,
        22,
        37,
        56,
        68,
        109,
        103,
        77,
        24,
        35,
        55,
        64,
        81,
        104,
        113,
        92,
        49,
        64,
        78,
        87,
        103,
        121,
        120,
        101,
        72,
        92,
        95,
        98,
        112,
        100,
        103,
        99,
    ],
    dtype=torch.float32,
).view(8, 8)
_CHROMA_Q = torch.full((8, 8), 99.0)
_CHROMA_Q[:4, :4] = torch.tensor(
    [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]], dtype=torch.float32
)


def _dct_matrix(device: torch.device) -> torch.Tensor:
    n = torch.arange(8, dtype=torch.float32, device=device)
    matrix = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    matrix[0] /= math.sqrt(2)
    return matrix


def _quant_table(base: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """IJG quality scaling of a quantization table, per image: ``B×8×8``."""
    quality = quality.clamp(1, 100)
    scale = torch.where(quality < 50, 5000 / quality, 200 - 2 * quality)
    table = torch.floor((base.to(quality.device)[None] * scale.view(-1, 1, 1) + 50) / 100)
    return table.clamp(1, 255)


def _code_plane(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Block DCT → quantize → dequantize → inverse DCT of ``B×H×W`` (H, W multiples of 8)."""
    batch, height, width = plane.shape
    dct = _dct_matrix(plane.device)
    blocks = plane.reshape(batch, height // 8, 8, width // 8, 8).permute(0, 1, 3, 2, 4)
    coeffs = dct @ blocks @ dct.T
    q = table.to(plane)[:, None, None]
    coeffs = torch.round(coeffs / q) * q
    blocks = dct.T @ coeffs @ dct
    return blocks.permute(0, 1, 3, 2, 4).reshape(batch, height, width)


def jpeg(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG round trip (YCbCr, 4:2:0 chroma, standard tables) of ``B×3×H×W`` in [0, 1]."""
    batch, _, height, width = images.shape
    pad_h, pad_w = (-height) % 16, (-width) % 16
    x = F.pad(images.clamp(0, 1) * 255.0, (0, pad_w, 0, pad_h), mode="replicate")
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    quality = quality.to(images.device, torch.float32)
    y = _code_plane(y - 128, _quant_table(_LUMA_Q, quality)) + 128
    chroma_table = _quant_table(_CHROMA_Q, quality)
    planes = []
    for plane in (cb, cr):
        small = F.avg_pool2d(plane.unsqueeze(1), 2).squeeze(1)
        pad_small_h, pad_small_w = (-small.shape[-2]) % 8, (-small.shape[-1]) % 8
        small = F.pad(small.unsqueeze(1), (0, pad_small_w, 0, pad_small_h), mode="replicate").squeeze(1)
        coded = _code_plane(small - 128, chroma_table) + 128
        coded = coded[:, : plane.shape[-2] // 2, : plane.shape[-1] // 2]
        planes.append(F.interpolate(coded.unsqueeze(1), scale_factor=2, mode="nearest").squeeze(1))
    cb, cr = planes
    r = y + 1.402 * (cr - 128)
    g = y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128)
    b = y + 1.772 * (cb - 128)
    out = torch.stack([r, g, b], dim=1)[..., :height, :width] / 255.0
    return out.clamp(0, 1)


# ---------------------------------------------------------------------------- pipeline
_RESIZE_MODES = ("area", "bilinear", "bicubic")


def _random_resize(
    images: torch.Tensor, stage: StageConfig, generator: torch.Generator, base: tuple[int, int]
) -> torch.Tensor:
    kind = _choice(generator, stage.resize_probs)
    if kind == 0:
        factor = _uniform(generator, 1.0, stage.resize_range[1])
    elif kind == 1:
        factor = _uniform(generator, stage.resize_range[0], 1.0)
    else:
        factor = 1.0
    mode = _RESIZE_MODES[int(torch.randint(0, 3, (), generator=generator))]
    size = (max(8, int(base[0] * factor)), max(8, int(base[1] * factor)))
    return _resize(images, size, mode)


def _resize(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if mode == "area":
        return F.interpolate(images, size=size, mode="area")
    return F.interpolate(images, size=size, mode=mode, align_corners=False)


def _noise(images: torch.Tensor, stage: StageConfig, generator: torch.Generator) -> torch.Tensor:
    batch = images.shape[0]
    gaussian = torch.rand(batch, generator=generator) < stage.gaussian_noise_prob
    gray = torch.rand(batch, generator=generator) < stage.gray_noise_prob
    sigma = stage.noise_range[0] + (stage.noise_range[1] - stage.noise_range[0]) * torch.rand(
        batch, generator=generator
    )
    scale = stage.poisson_scale_range[0] + (stage.poisson_scale_range[1] - stage.poisson_scale_range[0]) * torch.rand(
        batch, generator=generator
    )
    with_gaussian = add_gaussian_noise(images, sigma, gray, generator)
    with_poisson = add_poisson_noise(images, scale, gray, generator)
    return torch.where(gaussian.view(-1, 1, 1, 1).to(images.device), with_gaussian, with_poisson)


def _jpeg_random(images: torch.Tensor, stage: StageConfig, generator: torch.Generator) -> torch.Tensor:
    quality = stage.jpeg_range[0] + (stage.jpeg_range[1] - stage.jpeg_range[0]) * torch.rand(
        images.shape[0], generator=generator
    )
    return jpeg(images, torch.round(quality))


def degrade(
    hr: torch.Tensor, config: DegradationConfig = DegradationConfig(), generator: torch.Generator | None = None
) -> torch.Tensor:
    """The full second-order degradation of a batch of HR images; returns LR at ``H/s × W/s``."""
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"hr must be B×3×H×W, got {tuple(hr.shape)}")
    generator = generator or torch.Generator().manual_seed(0)
    batch, _, height, width = hr.shape
    out_size = (height // config.scale, width // config.scale)
    x = hr.float()
    # First order.
    x = filter2d(x, torch.stack([random_kernel(config.first, generator) for _ in range(batch)]))
    x = _random_resize(x, config.first, generator, (height, width))
    x = _noise(x, config.first, generator)
    x = _jpeg_random(x.clamp(0, 1), config.first, generator)
    # Second order.
    if float(torch.rand((), generator=generator)) < config.second_blur_prob:
        x = filter2d(x, torch.stack([random_kernel(config.second, generator) for _ in range(batch)]))
    x = _random_resize(x, config.second, generator, out_size)
    x = _noise(x, config.second, generator)
    # Final: [resize back + sinc, JPEG] or [JPEG, resize back + sinc].
    if float(torch.rand((), generator=generator)) < config.final_sinc_prob:
        size = 2 * int(torch.randint(3, 11, (), generator=generator)) + 1
        final_kernel = F.pad(sinc_kernel(size, _uniform(generator, math.pi / 3, math.pi)), ((21 - size) // 2,) * 4)
    else:
        final_kernel = torch.zeros(21, 21)
        final_kernel[10, 10] = 1.0  # identity pulse
    kernels = final_kernel.expand(batch, 21, 21)
    mode = _RESIZE_MODES[int(torch.randint(0, 3, (), generator=generator))]
    if float(torch.rand((), generator=generator)) < 0.5:
        x = filter2d(_resize(x, out_size, mode), kernels)
        x = _jpeg_random(x.clamp(0, 1), config.second, generator)
    else:
        x = _jpeg_random(x.clamp(0, 1), config.second, generator)
        x = filter2d(_resize(x, out_size, mode), kernels)
    # Quantize to 8 bits, as an LR photo would be.
    return (x.clamp(0, 1) * 255.0).round() / 255.0
