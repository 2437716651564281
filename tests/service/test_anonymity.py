"""The one rule for serving without API keys, as ``create_app`` and ``megasr serve`` apply it."""

from __future__ import annotations

import pytest

from service.anonymity import InsecureConfiguration, is_loopback, refuse_accidental_anonymity
from service.config import Settings

KEYS = {"secret-key": "acme"}


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LocalHost"])
def test_loopback_addresses(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "example.org", "192.168.1.1"])
def test_other_addresses(host):
    assert not is_loopback(host)


def test_keys_or_an_explicit_allow_serve_as_they_are():
    for settings, keys in ((Settings(host="0.0.0.0"), KEYS), (Settings(host="0.0.0.0", allow_anonymous=True), {})):
        assert refuse_accidental_anonymity(settings, keys) is settings
        assert refuse_accidental_anonymity(settings, keys, loopback_is_consent=True) is settings


def test_the_app_refuses_anonymity_nobody_asked_for_even_on_loopback():
    with pytest.raises(InsecureConfiguration, match="MEGASR_ALLOW_ANONYMOUS=1"):
        refuse_accidental_anonymity(Settings(host="127.0.0.1"), {})


def test_megasr_serve_serves_anonymously_on_loopback_only():
    settings = refuse_accidental_anonymity(Settings(host="127.0.0.1"), {}, loopback_is_consent=True)
    assert settings.allow_anonymous
    with pytest.raises(InsecureConfiguration, match="refusing to listen on 0.0.0.0 without API keys"):
        refuse_accidental_anonymity(Settings(host="0.0.0.0"), {}, loopback_is_consent=True)
