"""Training data: Real-ESRGAN degradations, USM sharpening and (LR, HR) pair datasets.

Runtime data files (RAM's tag vocabulary, NIQE's parameters) live in ``megasr_core.assets``.
"""

from .datasets import PairedImageDataset, list_images, make_pairs, random_hflip
from .degradations import DegradationConfig, StageConfig, anisotropic_kernel, degrade, jpeg, random_kernel, sinc_kernel
from .sharpen import USMConfig, usm_sharpen

__all__ = [
    "PairedImageDataset",
    "list_images",
    "make_pairs",
    "DegradationConfig",
    "StageConfig",
    "anisotropic_kernel",
    "degrade",
    "jpeg",
    "random_kernel",
    "sinc_kernel",
    "random_hflip",
    "USMConfig",
    "usm_sharpen",
]
