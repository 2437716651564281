"""megasr_core: the MegaSR model, guidance extractors, pipeline and weights handling.

Usable without the service: ``from megasr_core import MegaSRDenoiser``.
"""

from .models import MegaSRConfig, MegaSRDenoiser, WeightsError
from .pipelines import InvalidImageError, MegaSRPipeline, PipelineCancelled

__version__ = "0.1.0"

__all__ = [
    "InvalidImageError",
    "MegaSRConfig",
    "MegaSRDenoiser",
    "MegaSRPipeline",
    "PipelineCancelled",
    "WeightsError",
    "__version__",
]
