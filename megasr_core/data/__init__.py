"""Training data: Real-ESRGAN degradations and (LR, HR) pair datasets.

The folder also holds vendored data files (RAM's tag vocabulary; see README.md here).
"""

from .datasets import PairedImageDataset, list_images, make_pairs, random_hflip
from .degradations import DegradationConfig, StageConfig, anisotropic_kernel, degrade, jpeg, random_kernel, sinc_kernel
from .sharpen import USMConfig, usm_sharpen

__all__ = ["PairedImageDataset", "list_images", "make_pairs", "DegradationConfig", "StageConfig", "anisotropic_kernel", "degrade", "jpeg", "random_kernel", "sinc_kernel",
           "random_hflip", "USMConfig", "usm_sharpen"]
