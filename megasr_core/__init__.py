"""megasr_core: the MegaSR model, guidance extractors, pipeline and weights handling.

Usable without the service: ``from megasr_core import MegaSRDenoiser``. The exports load lazily
(PEP 562) so torch-free submodules such as :mod:`megasr_core.geometry` can be imported by the
API, which never imports torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: export name → the submodule that defines it
_EXPORTS = {
    "InvalidImageError": "megasr_core.pipelines",
    "MegaSRConfig": "megasr_core.models",
    "MegaSRDenoiser": "megasr_core.models",
    "MegaSRPipeline": "megasr_core.pipelines",
    "PipelineCancelled": "megasr_core.pipelines",
    "WeightsError": "megasr_core.weights.files",
}

__all__ = [*sorted(_EXPORTS), "__version__"]

if TYPE_CHECKING:
    from .models import MegaSRConfig, MegaSRDenoiser
    from .pipelines import InvalidImageError, MegaSRPipeline, PipelineCancelled
    from .weights.files import WeightsError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'megasr_core' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
