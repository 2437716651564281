"""The HTTP tests' app: ``settings`` (a test module overrides it for its own limits, keys or database)
and one ``client``, a TestClient of the app built from them. The real services (Valkey, SeaweedFS)
are the session's, from tests/conftest.py."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.service.helpers import make_settings


@pytest.fixture()
def settings(tmp_path, redis_url) -> Settings:
    """``make_settings``' defaults on the session's Valkey (database 0) and a local store in ``tmp_path``."""
    return make_settings(tmp_path, redis_url)


@pytest.fixture()
def raise_server_exceptions() -> bool:
    """Whether ``client`` raises an exception the app did not handle (True), or returns the 500 a server
    would send (a module that checks that nothing ends in a 500 overrides it with False)."""
    return True


@pytest.fixture()
def client(settings, raise_server_exceptions):
    """A TestClient of the app built from ``settings``, its lifespan started; one app per test."""
    with TestClient(create_app(settings), raise_server_exceptions=raise_server_exceptions) as test_client:
        yield test_client
