"""The API server's connection limits, as ``uvicorn.run`` keyword arguments, from the settings.

Every way the API is started passes these: ``megasr serve`` and ``python -m service.api_server``
(the API image's command, which Docker Compose and the Kubernetes Deployment run unchanged), so a
slow or idle client is cut off the same way everywhere:

- the request head must be complete ``MEGASR_HEADER_TIMEOUT_S`` after connecting or after the
  previous response (:mod:`service.http_protocol`);
- an idle keep-alive connection closes after ``MEGASR_KEEPALIVE_TIMEOUT_S``;
- past ``MEGASR_MAX_CONNECTIONS`` open connections a new one gets 503 and is closed;
- a request body that stalls for ``MEGASR_BODY_IDLE_TIMEOUT_S`` ends with 408 (``service.body_limits``).
"""

from __future__ import annotations

from typing import Any

from .config import Settings
from .http_protocol import guarded_protocol

#: the longest request head (request line and headers) h11 buffers; larger heads get 400
MAX_HEAD_BYTES = 16 * 1024


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of ``uvicorn.run``/``uvicorn.Config`` that bound what one connection may hold."""
    return {
        "http": guarded_protocol(settings.header_timeout_s, settings.max_connections),
        "timeout_keep_alive": settings.keepalive_timeout_s,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
        "log_config": None,  # uvicorn's loggers go through configure_logging's handler (format, redaction)
    }
