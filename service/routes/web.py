"""The browser page at ``/``, its static assets under ``/static`` and ``/docs`` with local assets.

None of these need an API key: the page asks for one and sends it as a Bearer header to the
``/v1`` API itself. Nothing is loaded from a CDN, so the page and ``/docs`` work offline.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
STATIC_PREFIX = "/static"
SWAGGER_DIR = f"{STATIC_PREFIX}/vendor/swagger-ui"

#: The page runs only its own module scripts and styles; images may also be the blob: URLs of
#: uploads and results. No inline script, no framing, no form posts elsewhere.
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
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
                message["headers"] = [*message.get("headers", []),
                                      *((k.lower().encode(), v.encode()) for k, v in PAGE_HEADERS.items())]
            await send(message)

        await super().__call__(scope, receive, send_with_headers)


@router.get("/")
def page() -> FileResponse:
    """The upload page (plain HTML and ES modules; no build step)."""
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get("/docs")
def docs(request: Request) -> HTMLResponse:
    """Swagger UI from the vendored ``swagger-ui-dist`` (service/web/vendor/swagger-ui)."""
    root = request.scope.get("root_path", "")
    response = get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}", title=f"{request.app.title} - API",
        swagger_js_url=f"{root}{SWAGGER_DIR}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{SWAGGER_DIR}/swagger-ui.css",
        swagger_favicon_url=f"{root}{SWAGGER_DIR}/favicon-32x32.png",
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
