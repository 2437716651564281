"""The browser page at ``/``, its static assets under ``/static`` and ``/docs`` with local assets.

None of these need an API key: the page asks for one and sends it as a Bearer header to the
``/v1`` API itself. Nothing is loaded from a CDN, so the page and ``/docs`` work offline, and every
HTML answer carries the same Content-Security-Policy (own scripts only, no inline script, no
framing): ``/docs`` starts Swagger UI from ``static/docs.js``, and :class:`HtmlSecurityHeaders`
adds the policy to any other HTML response. There is no ``/redoc`` (it would load a script from a
CDN onto the origin whose page keeps the key in ``sessionStorage``).
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse
from starlette.datastructures import MutableHeaders
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
STATIC_PREFIX = "/static"
SWAGGER_DIR = f"{STATIC_PREFIX}/vendor/swagger-ui"

#: The page runs only its own module scripts and styles; images may also be the blob: URLs of
#: uploads and results. No inline script, no framing, no form posts elsewhere.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


class WebAssets(StaticFiles):
    """The page's files, with the page's security headers (a stray HTML file runs under the same CSP)."""

    def __init__(self) -> None:
        super().__init__(directory=WEB_DIR)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    *((k.lower().encode(), v.encode()) for k, v in PAGE_HEADERS.items()),
                ]
            await send(message)

        await super().__call__(scope, receive, send_with_headers)


@router.get("/")
def page() -> FileResponse:
    """The upload page (plain HTML and ES modules; no build step)."""
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


class HtmlSecurityHeaders:
    """ASGI middleware: an HTML response without a Content-Security-Policy gets the page's headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if headers.get("content-type", "").startswith("text/html") and "content-security-policy" not in headers:
                    for name, value in PAGE_HEADERS.items():
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


@router.get("/docs")
def docs(request: Request) -> HTMLResponse:
    """Swagger UI from the vendored ``swagger-ui-dist`` (service/web/vendor/swagger-ui), started by ``docs.js``."""
    root = escape(request.scope.get("root_path", ""))
    html = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{escape(request.app.title)} - API</title>
<link rel="stylesheet" href="{root}{SWAGGER_DIR}/swagger-ui.css">
<link rel="icon" href="{root}{SWAGGER_DIR}/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{root}{escape(request.app.openapi_url or "")}"></div>
<script src="{root}{SWAGGER_DIR}/swagger-ui-bundle.js"></script>
<script src="{root}{STATIC_PREFIX}/docs.js"></script>
</body>
</html>
"""
    return HTMLResponse(html, headers=PAGE_HEADERS)
