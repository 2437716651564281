"""The MegaSR pipeline and its helpers (image handling, tiling, colour fix)."""

from .color_fix import adain, color_fix, wavelet
from .image_processing import InvalidImageError, load_image, open_image, prepare_image, to_pil
from .pipeline_megasr import DEFAULT_NEGATIVE_PROMPT, MegaSRPipeline, MegaSRPipelineOutput, PipelineCancelled

__all__ = [
    "DEFAULT_NEGATIVE_PROMPT",
    "InvalidImageError",
    "MegaSRPipeline",
    "MegaSRPipelineOutput",
    "PipelineCancelled",
    "adain",
    "color_fix",
    "load_image",
    "open_image",
    "prepare_image",
    "to_pil",
    "wavelet",
]
