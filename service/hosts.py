"""Which ``Host`` headers the API answers: Starlette's ``TrustedHostMiddleware`` from the settings.

Links are never built from ``Host`` (see ``routes.jobs._link``); refusing unknown hosts on top
keeps anything else that reads the request URL honest. The health probes and ``/metrics`` are
exempt: Kubernetes probes and Prometheus address a pod by its IP, which no allowlist can name.
"""

from __future__ import annotations

from urllib.parse import urlparse

from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from .config import Settings

#: always accepted next to the host of ``MEGASR_PUBLIC_URL``: clients on the machine itself
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")
#: paths answered whatever the Host header (probes and scrapes by pod IP)
UNCHECKED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def allowed_hosts(settings: Settings) -> list[str] | None:
    """``MEGASR_ALLOWED_HOSTS`` (comma-separated; ``*.example.com`` wildcards) when set; else the
    host of ``MEGASR_PUBLIC_URL`` plus loopback; else ``None``: any host."""
    if settings.allowed_hosts and settings.allowed_hosts.strip():
        return [host.strip().lower() for host in settings.allowed_hosts.split(",") if host.strip()]
    if settings.public_url:
        host = urlparse(settings.public_url).hostname
        if host:
            return [host.lower(), *LOOPBACK_HOSTS]
    return None


class TrustedHosts:
    """``TrustedHostMiddleware`` (400 for other hosts) on every path but :data:`UNCHECKED_PATHS`."""

    def __init__(self, app: ASGIApp, hosts: list[str]) -> None:
        self.app = app
        self.checked = TrustedHostMiddleware(app, allowed_hosts=hosts, www_redirect=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"] not in UNCHECKED_PATHS:
            await self.checked(scope, receive, send)
        else:
            await self.app(scope, receive, send)
