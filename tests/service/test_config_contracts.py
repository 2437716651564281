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


def test_params_defaults_leave_sampling_to_the_model():
    """Steps and guidance left out are the served model's (50 at 5.5 for MegaSR, 2 at 1 for SeeSR-Turbo:
    the worker fills them in); the model left out is the deployment's default."""
    params = UpscaleParams()
    assert (params.scale, params.steps, params.guidance_scale, params.color_fix, params.model) == (
        4,
        None,
        None,
        "adain",
        None,
    )
    assert UpscaleParams(steps=200, guidance_scale=0).steps == 200


def test_models_settings_name_the_served_models_and_their_queues(monkeypatch):
    settings = Settings()
    assert (settings.served_models(), settings.default_model, settings.worker_model) == (
        ["default"],
        "default",
        "default",
    )
    assert settings.queue_for("default") == "megasr"  # every single-model deployment keeps its queue
    monkeypatch.setenv("MEGASR_MODEL", "seesr-turbo")
    monkeypatch.setenv("MEGASR_QUEUE_NAME", "sr")
    settings = Settings()
    assert settings.served_models() == ["seesr-turbo"]
    assert settings.default_model == settings.worker_model == "seesr-turbo"
    assert settings.queue_for("seesr-turbo") == "sr-seesr-turbo" and settings.queue_for("default") == "sr"
    monkeypatch.setenv("MEGASR_MODELS", " megasr, seesr.v1 ,seesr-turbo,")
    settings = Settings()
    assert settings.served_models() == ["megasr", "seesr.v1", "seesr-turbo"]
    assert settings.default_model == "megasr" and settings.worker_model == "seesr-turbo"


@pytest.mark.parametrize(
    "env, value, message",
    [
        ("MEGASR_MODELS", "a,b,a", "more than once"),
        ("MEGASR_MODELS", "a,B", "not a model name"),
        ("MEGASR_MODEL", "-lead", "not a model name"),
        ("MEGASR_MODEL", "has space", "not a model name"),
        ("MEGASR_MODEL", "x" * 64, "not a model name"),
        ("MEGASR_MODELS", "ok,with/slash", "not a model name"),
    ],
)
def test_bad_model_names_are_refused(monkeypatch, env, value, message):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


@pytest.mark.parametrize("name", ["a", "seesr-turbo", "m.v2_b", "0" + "x" * 62])
def test_good_model_names_pass(name):
    assert Settings(model=name).worker_model == name and UpscaleParams(model=name).model == name


@pytest.mark.parametrize(
    "field, value",
    [
        ("scale", 0),
        ("scale", 9),
        ("scale", float("nan")),
        ("steps", 0),
        ("steps", 10_000),
        ("guidance_scale", -1),
        ("color_fix", "sepia"),
        ("output_format", "gif"),
        ("webhook_url", "ftp://x"),
        ("seed", -5),
        ("prompt", "x" * 501),
        ("unknown", 1),
        ("model", "Bad Name"),
        ("model", ""),
        ("model", "x" * 64),
        ("steps", True),
    ],
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
