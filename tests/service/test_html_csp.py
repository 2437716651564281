"""Every HTML answer carries the page's Content-Security-Policy (own scripts only, no inline script, no
framing); /docs runs Swagger UI under it, and there is no /redoc (FastAPI's loads a CDN script)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.responses import HTMLResponse
from fastapi.testclient import TestClient

from service.app import create_app
from tests.harness.live_server import live_server
from tests.service.helpers import make_settings

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture()
def app(tmp_path, db_url):
    return create_app(make_settings(tmp_path, db_url))


def assert_page_headers(response) -> None:
    csp = response.headers.get("content-security-policy", "")
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";") if d.strip())
    assert directives.get("script-src") == "'self'" and directives.get("default-src") == "'self'", csp
    assert directives.get("frame-ancestors") == "'none'" and "unsafe" not in csp and "http" not in csp, csp
    assert response.headers["x-frame-options"] == "DENY" and response.headers["x-content-type-options"] == "nosniff"


def test_there_is_no_redoc(app):
    with TestClient(app) as client:
        response = client.get("/redoc")
        assert response.status_code == 404 and response.json()["error"]["code"]
        assert "redoc" not in client.get("/docs").text.lower()


def test_every_html_answer_carries_the_csp_and_runs_no_inline_script(app):
    @app.get("/an-html-route")  # any HTML a future route answers gets the policy too
    def an_html_route() -> HTMLResponse:
        return HTMLResponse("<p>hello</p>")

    with TestClient(app) as client:
        for path in ("/", "/docs", "/static/index.html"):
            response = client.get(path)
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/html"), path
            assert_page_headers(response)
            scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", response.text, flags=re.DOTALL)
            assert scripts and all(
                re.search(r'\bsrc="(?!https?:|//)[^"]+"', attributes) and not body.strip()
                for attributes, body in scripts
            ), path  # own files only, nothing inline
        assert_page_headers(client.get("/an-html-route"))
        docs = client.get("/docs").text
        assert 'src="/static/docs.js"' in docs and 'data-openapi-url="/openapi.json"' in docs
        assert (
            client.get("/static/docs.js")
            .headers["content-type"]
            .startswith(("text/javascript", "application/javascript"))
        )


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium")
def test_swagger_ui_renders_under_the_csp_without_violations(app):
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with live_server(app) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda message: message.type in ("error", "warning") and problems.append(message.text))
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.goto(f"{base}/docs")
            page.locator(".swagger-ui .info .title").filter(has_text="MegaSR").wait_for(timeout=30_000)
            page.locator(".opblock-summary-path", has_text="/v1/upscale").first.wait_for()
        finally:
            browser.close()
    assert not [p for p in problems if "Content Security Policy" in p or "Refused" in p], problems
