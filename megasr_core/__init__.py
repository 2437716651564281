"""megasr_core: the MegaSR model, weights handling and (later) pipeline and training.

Usable without the service: ``from megasr_core import MegaSRDenoiser``.
"""

from .models import MegaSRConfig, MegaSRDenoiser, WeightsError

__version__ = "0.1.0"

__all__ = ["MegaSRConfig", "MegaSRDenoiser", "WeightsError", "__version__"]
