"""Serving without API keys: only on purpose, never by accident.

No keys means no authentication at all, so the API serves anonymously only when
``MEGASR_ALLOW_ANONYMOUS`` says so, or when ``megasr serve`` binds a loopback address, which only
this machine's users can reach. ``create_app`` and ``megasr serve`` both apply this one rule.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from .config import Settings


class InsecureConfiguration(RuntimeError):
    """The app would serve every caller without an API key, and nobody asked for that."""


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (bracketed or not) and localhost: reachable from this machine only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def refuse_accidental_anonymity(
    settings: Settings, tenant_keys: Mapping[str, str], *, loopback_is_consent: bool = False
) -> Settings:
    """The settings to serve with; ``InsecureConfiguration`` when they would serve without keys unasked.

    With ``loopback_is_consent`` (``megasr serve``), binding a loopback address asks for anonymous
    serving: the settings come back with ``allow_anonymous`` set.
    """
    if tenant_keys or settings.allow_anonymous:
        return settings
    if not loopback_is_consent:
        raise InsecureConfiguration(
            "no API keys are configured, so every caller would be served anonymously: set MEGASR_API_KEYS "
            "(tenant:key,...) or MEGASR_API_KEYS_FILE, or set MEGASR_ALLOW_ANONYMOUS=1 to serve without keys "
            "on purpose (megasr serve does so itself on 127.0.0.1)"
        )
    if not is_loopback(settings.host):
        raise InsecureConfiguration(
            f"refusing to listen on {settings.host} without API keys: set MEGASR_API_KEYS (or MEGASR_API_KEYS_FILE), "
            "or bind to 127.0.0.1 (MEGASR_ALLOW_ANONYMOUS=1 serves without keys on purpose)"
        )
    return settings.model_copy(update={"allow_anonymous": True})  # loopback: this machine's users only
