"""Degradation-aware guidance extractors (DAGE): HED, depth, segmentation, CLIP tokens, tags.

Tensors in (LR images ``B×3×H×W`` in [0, 1]), tensors out, each at its own native resolution
and resized back to the input's size.
"""

from .base import check_images
from .clip_image import CLIPImageEncoder
from .depth import DepthExtractor
from .guidance import NAMES, GuidanceExtractors, GuidanceOutput, init_tiny_extractors
from .hed import HEDConfig, HEDExtractor, HEDNetwork, fuse_side_outputs
from .lora import attach_lora, has_lora, load_lora, merge_lora, save_lora
from .presets import ExtractorPreset, real_preset, tiny_preset
from .ram import RAMConfig, RAMTagger
from .segmentation import Mask2FormerBackend, SegmentationBackend, SegmentationExtractor, class_palette
from .tagger import CLIPZeroShotTagger, Tagger, load_vocabulary

__all__ = [
    "CLIPImageEncoder",
    "CLIPZeroShotTagger",
    "DepthExtractor",
    "ExtractorPreset",
    "GuidanceExtractors",
    "GuidanceOutput",
    "HEDConfig",
    "HEDExtractor",
    "HEDNetwork",
    "Mask2FormerBackend",
    "NAMES",
    "RAMConfig",
    "RAMTagger",
    "SegmentationBackend",
    "SegmentationExtractor",
    "Tagger",
    "attach_lora",
    "check_images",
    "class_palette",
    "fuse_side_outputs",
    "has_lora",
    "init_tiny_extractors",
    "load_lora",
    "load_vocabulary",
    "merge_lora",
    "real_preset",
    "save_lora",
    "tiny_preset",
]
