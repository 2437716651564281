"""Rendered manifests: every overlay through `kubectl kustomize`, parsed once per session."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import OVERLAYS, render


@pytest.fixture(scope="session", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)
