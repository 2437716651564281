"""``python -m service.api_server``: the API image's command (Docker Compose and Kubernetes run it as is).

It is ``uvicorn service.app:create_app --factory --proxy-headers`` plus what the bare uvicorn
command cannot give: the connection limits of :mod:`service.server_options` (request-head and
keep-alive deadlines, a connection cap) and the megasr log handler (``MEGASR_LOG_FORMAT``, secrets
redacted, accept-error floods throttled) for uvicorn's own loggers. As with uvicorn's command,
``FORWARDED_ALLOW_IPS`` names the proxies whose ``X-Forwarded-For``/``-Proto`` are believed.
"""

from __future__ import annotations

import argparse
import sys

import uvicorn
from pydantic import ValidationError

from .anonymity import InsecureConfiguration
from .app import create_app
from .config import Settings
from .logging_setup import configure_from_settings
from .server_options import uvicorn_options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.api_server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", help="address to bind (default: $MEGASR_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: $MEGASR_PORT or 8000)")
    args = parser.parse_args(argv)
    try:
        settings = Settings(**{k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})
    except ValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_from_settings(settings)
    try:
        app = create_app(settings)
    except (InsecureConfiguration, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # forwarded_allow_ips unset: uvicorn reads FORWARDED_ALLOW_IPS (default 127.0.0.1), as its command does
    uvicorn.run(app, host=settings.host, port=settings.port, proxy_headers=True, **uvicorn_options(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
