"""Settings (API keys from env or file, secrets hidden) and the job parameter contract."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import Settings
from service.contracts import JobStatus, UpscaleParams, output_key


def test_api_keys_from_env_and_file(tmp_path, monkeypatch):
    secret_file = tmp_path / "keys"
    secret_file.write_text("beta:bbbbbbbbbbbb\n\ngamma:cccccccccccc\n")
    monkeypatch.setenv("MEGASR_API_KEYS", "alpha:aaaaaaaaaaaa")
    monkeypatch.setenv("MEGASR_API_KEYS_FILE", str(secret_file))
    settings = Settings()
    assert settings.tenant_keys() == {"aaaaaaaaaaaa": "alpha", "bbbbbbbbbbbb": "beta", "cccccccccccc": "gamma"}
    assert "aaaaaaaaaaaa" not in repr(settings) and "aaaaaaaaaaaa" not in str(settings.model_dump())


@pytest.mark.parametrize("value", ["nocolon", "tenant:short", ":keykeykeykey"])
def test_malformed_api_keys(monkeypatch, value):
    monkeypatch.setenv("MEGASR_API_KEYS", value)
    with pytest.raises(ValueError, match="tenant:key"):
        Settings().tenant_keys()


def test_defaults_and_storage_url(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGASR_HOME", str(tmp_path))
    settings = Settings()
    assert settings.tenant_keys() == {}
    assert settings.resolved_storage_url == (tmp_path / "data").resolve().as_uri()
    assert settings.queue_name == "megasr"


@pytest.mark.parametrize(("value", "expected"), [(None, None), ("false", False), ("0", False), ("true", True)])
def test_worker_speed_settings_from_env(monkeypatch, value, expected):
    """MEGASR_CUDA_GRAPHS: unset = on with CUDA (None), else an explicit switch; compile scopes."""
    monkeypatch.delenv("MEGASR_CUDA_GRAPHS", raising=False)
    if value is not None:
        monkeypatch.setenv("MEGASR_CUDA_GRAPHS", value)
    monkeypatch.setenv("MEGASR_COMPILE", "off")
    settings = Settings()
    assert settings.cuda_graphs is expected and settings.compile is None
    monkeypatch.setenv("MEGASR_COMPILE", "fastest")
    with pytest.raises(ValidationError, match="compile"):
        Settings()


def test_params_defaults_follow_the_paper():
    params = UpscaleParams()
    assert (params.scale, params.steps, params.guidance_scale, params.color_fix) == (4, 50, 5.5, "adain")


@pytest.mark.parametrize(
    "field, value",
    [("scale", 0), ("scale", 9), ("scale", float("nan")), ("steps", 0), ("steps", 10_000), ("guidance_scale", -1),
     ("color_fix", "sepia"), ("output_format", "gif"), ("webhook_url", "ftp://x"), ("seed", -5), ("prompt", "x" * 501),
     ("unknown", 1)],
)
def test_bad_params_are_rejected(field, value):
    with pytest.raises(ValidationError):
        UpscaleParams(**{field: value})


def test_statuses_and_keys():
    assert [s.value for s in JobStatus] == ["queued", "running", "succeeded", "failed", "canceled"]
    assert JobStatus.canceled.is_final and not JobStatus.running.is_final
    assert output_key("j", "jpeg") == "jobs/j/output.jpg"


def test_webhook_url_length_is_bounded():
    """The URL is stored in the job record: a megabyte-long one must not get that far."""
    from pydantic import ValidationError

    from service.contracts import MAX_WEBHOOK_URL_LENGTH, UpscaleParams

    base = "https://hooks.example.com/"
    UpscaleParams(webhook_url=base + "x" * (MAX_WEBHOOK_URL_LENGTH - len(base)))
    with pytest.raises(ValidationError, match="at most 2048"):
        UpscaleParams(webhook_url=base + "x" * (MAX_WEBHOOK_URL_LENGTH - len(base) + 1))
