"""megasr-client: a light Python client of the MegaSR API (httpx and pydantic; no torch, no model).

pip install ./client         # from a clone of megasr; the full package includes it too
"""

from __future__ import annotations

from .client import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    JobFailedError,
    MegaSRClient,
    MegaSRError,
    NotFoundError,
    RateLimitedError,
    ServiceUnavailableError,
)
from .models import ImageSize, Job, JobError, JobMetrics, JobPage, JobParams, JobStatus, JobUrls, Model, ModelInfo

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "ConflictError",
    "ImageSize",
    "InvalidRequestError",
    "Job",
    "JobError",
    "JobFailedError",
    "JobMetrics",
    "JobPage",
    "JobParams",
    "JobStatus",
    "JobUrls",
    "MegaSRClient",
    "MegaSRError",
    "Model",
    "ModelInfo",
    "NotFoundError",
    "RateLimitedError",
    "ServiceUnavailableError",
    "__version__",
]
