"""Settings of the API, the worker and the embedded server: environment variables ``MEGASR_*``.

One pydantic-settings class behind an ``lru_cache`` getter (tests build their own). Secrets
(API keys, the webhook secret) are ``SecretStr``: they never appear in reprs or logs. API keys
can come from ``MEGASR_API_KEYS`` or, better for Kubernetes/Docker secrets, a file named by
``MEGASR_API_KEYS_FILE`` (same ``tenant:key,...`` format; commas or newlines between entries).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .contracts import DEFAULT_MODEL, DEFAULT_QUEUE, MODEL_NAME_PATTERN
from .decode_budget import DEFAULT_MAX_DECODE_SECONDS, DEFAULT_MAX_JPEG_SCANS


def _default_home() -> Path:
    home = os.environ.get("MEGASR_HOME")
    return Path(home) if home else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megasr"


class Settings(BaseSettings):
    """Every knob of the service; see docs/configuration.md."""

    model_config = SettingsConfigDict(env_prefix="MEGASR_", extra="ignore")

    redis_url: str | None = Field(None, description="Redis/Valkey URL; unset = embedded Valkey (megasr serve)")
    storage_url: str | None = Field(None, description="file:///path or s3://bucket[/prefix]; unset = local data dir")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, SeaweedFS); unset = AWS")
    s3_region: str | None = None
    s3_public_url: str | None = Field(
        None,
        description="S3 endpoint that result links are signed for (what clients reach); unset = the endpoint above",
    )
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="S3 bucket addressing in requests and links"
    )
    presign_ttl_s: int = Field(3600, ge=60, le=7 * 86400)
    api_keys: SecretStr | None = Field(None, description="tenant:key,tenant:key")
    api_keys_file: Path | None = None
    webhook_secret: SecretStr | None = Field(None, description="HMAC-SHA256 key for webhook signatures")
    webhook_allow_private: bool = Field(False, description="allow webhook URLs on private/loopback addresses")
    webhook_retry_base_s: float = Field(2.0, gt=0)
    public_url: str | None = Field(
        None,
        description="external base URL of the API: Location, result_url and webhook links; unset = root-relative links",
    )
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_input_pixels: int = Field(2048 * 2048, ge=1)
    max_jpeg_scans: int = Field(
        DEFAULT_MAX_JPEG_SCANS, ge=1, description="most scans (progressive passes) a JPEG input may have"
    )
    max_decode_seconds: float = Field(
        DEFAULT_MAX_DECODE_SECONDS,
        gt=0,
        le=600,
        description="CPU seconds one input's decode may take (API admission and worker)",
    )
    queue_name: str = DEFAULT_QUEUE
    model: str | None = Field(
        None,
        description="the model a worker serves; in the API, the default model when "
        "MEGASR_MODELS is unset (unset: 'default')",
    )
    models: str | None = Field(None, description="comma-separated models the API routes to; the first is the default")
    job_timeout_s: int = Field(1800, ge=10)
    result_ttl_s: int = Field(24 * 3600, ge=60)
    max_queued_per_tenant: int = Field(100, ge=1)
    rate_limit_per_minute: int = Field(120, ge=1, description="token-bucket refill per tenant (requests per minute)")
    rate_limit_burst: int = Field(20, ge=1, description="token-bucket size per tenant: requests allowed at once")
    auth_failures_per_minute: int = Field(
        10, ge=1, description="failed authentications allowed per client IP per minute"
    )
    read_rate_limit_per_minute: int = Field(
        600, ge=1, description="token-bucket refill per tenant for GETs (per minute)"
    )
    read_rate_limit_burst: int = Field(120, ge=1, description="token-bucket size per tenant for GETs: reads at once")
    max_concurrent_reads_per_tenant: int = Field(
        8,
        ge=1,
        description="GETs of one tenant in flight per API process; the next one gets 429 too_many_concurrent_reads",
    )
    max_output_pixels: int = Field(
        4096 * 4096, ge=64 * 64, description="largest output and working canvas (pixels) a job may ask for"
    )
    max_aspect_ratio: float = Field(16.0, ge=1, description="largest long side / short side of an input image")
    storage_min_free_mb: int = Field(
        1024, ge=0, description="local storage: /readyz is not ready with less free space than this (MiB); 0 = no floor"
    )
    allow_anonymous: bool = Field(False, description="serve without API keys (megasr serve sets it on loopback)")
    metrics_key: SecretStr | None = Field(
        None, description="bearer key for /metrics; unset = /metrics only when anonymous"
    )
    allowed_hosts: str | None = Field(
        None, description="Host headers accepted (comma-separated); unset = any, or the host of public_url"
    )
    forwarded_allow_ips: str = Field("127.0.0.1", description="proxies whose X-Forwarded-For/-Proto are trusted")
    webhook_timeout_s: float = Field(5.0, gt=0, le=120, description="overall deadline of one webhook delivery")
    webhook_concurrency: int = Field(8, ge=1, le=256, description="webhook deliveries in flight per process")
    webhook_tenant_concurrency: int = Field(
        2, ge=1, le=256, description="one tenant's webhook deliveries in flight per process"
    )
    webhook_circuit_failures: int = Field(
        5,
        ge=1,
        description="attempts in a row that do not reach a tenant's webhook host before its deliveries there wait",
    )
    webhook_circuit_cooldown_s: float = Field(
        60.0, gt=0, le=86400, description="how long those deliveries wait before the host is tried again"
    )
    webhook_max_pending_per_tenant: int = Field(
        500, ge=1, description="webhook deliveries waiting per tenant; newer ones over it are dropped (logged, counted)"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as text or JSON objects (job_id, tenant, worker, stage, trace_id)"
    )
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces endpoint (needs the [otel] extra); unset = no tracing"
    )
    events_max_s: float = Field(
        900.0, gt=0, le=86400, description="longest a /v1/jobs/{id}/events stream stays open (clients reconnect)"
    )
    max_event_streams_per_tenant: int = Field(
        20, ge=1, description="open event streams per tenant and API process; the next one gets 429 too_many_streams"
    )
    max_event_streams: int = Field(
        800,
        ge=1,
        description="open event streams per API process (all tenants; below "
        "MEGASR_MAX_CONNECTIONS, so probes still get in); the next one gets 503 too_many_streams",
    )
    weights: Path | None = Field(None, description="MegaSR weights directory for workers")
    max_batch: int | None = Field(None, ge=1, le=64, description="images per GPU batch; unset = 8 on CUDA, 1 on CPU")
    batch_wait_ms: int = Field(20, ge=0, le=5000, description="how long a worker waits for batch mates")
    compile: Literal["blocks", "full"] | None = Field(
        None, description="torch.compile scope for workers; unset = eager"
    )
    compile_mode: Literal["max-autotune-no-cudagraphs"] | None = Field(
        None,
        description="torch.compile mode of the workers' compiled modules; unset = the default "
        "(max-autotune-no-cudagraphs tunes matmuls longer at start; the CUDA graphs stay the worker's own)",
    )
    compile_cache: Path | None = Field(
        None, description="persistent compile cache (a mounted volume); unset = <home>/compile-cache"
    )
    cuda_graphs: bool | None = Field(
        None, description="replay the denoiser step from CUDA graphs; unset = on with CUDA"
    )
    precision: Literal["full", "fp8"] = Field(
        "full",
        description="the denoiser's linear layers: full (as loaded) or fp8 (float8 GEMMs, GPUs of compute "
        "capability 8.9+; needs torchao, changes the output)",
    )
    warmup_buckets: str = Field(
        "512x512", description="output sizes (HxW, comma-separated) warmed up per batch size before /readyz"
    )
    warmup_large: str = Field(
        "2048x2048",
        description="tiled output sizes (HxW, comma-separated) warmed up at batch 1 by CUDA workers, so the "
        "tile shapes are captured or compiled before traffic; empty = none",
    )
    home: Path = Field(default_factory=_default_home, description="local data, demo weights, embedded Valkey")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="longest a client may take to send a request's "
        "headers (from connecting, or from the end of the previous response)",
    )
    body_idle_timeout_s: float = Field(
        30.0,
        gt=0,
        le=600,
        description="longest a request body may stall between two chunks before the request ends with 408",
    )
    keepalive_timeout_s: int = Field(5, ge=1, le=300, description="idle keep-alive connections close after this")
    max_connections: int = Field(
        1000, ge=1, description="open connections per API process; more are answered 503 and closed at once"
    )

    @field_validator("queue_name")
    @classmethod
    def _queue_name(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError("queue_name must be a non-empty word")
        return value

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return _model_name(value.strip(), "MEGASR_MODEL")

    @field_validator("models")
    @classmethod
    def _models(cls, value: str | None) -> str | None:
        names = [name.strip() for name in (value or "").split(",") if name.strip()]
        if not names:
            return None
        for name in names:
            _model_name(name, "MEGASR_MODELS")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"MEGASR_MODELS names {', '.join(repeated)} more than once")
        return ",".join(names)

    @field_validator("compile", "compile_mode", mode="before")
    @classmethod
    def _compile(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("", "0", "false", "off", "none") else value

    @field_validator("warmup_buckets", "warmup_large")
    @classmethod
    def _buckets(cls, value: str) -> str:
        for entry in filter(None, (e.strip() for e in value.split(","))):
            height, sep, width = entry.lower().partition("x")
            if not sep or not height.isdigit() or not width.isdigit() or int(height) < 8 or int(width) < 8:
                raise ValueError(f"warmup_buckets entries look like 512x512 (height x width), got {entry!r}")
        return value

    def warmup_sizes(self, large: bool = False) -> list[tuple[int, int]]:
        """(height, width) output sizes to warm up at every batch size (``large``: at batch 1)."""
        sizes = []
        for entry in filter(
            None, (e.strip() for e in (self.warmup_large if large else self.warmup_buckets).split(","))
        ):
            height, _, width = entry.lower().partition("x")
            sizes.append((int(height), int(width)))
        return sizes

    def served_models(self) -> list[str]:
        """The models the API routes to, the default first: MEGASR_MODELS, else MEGASR_MODEL (or 'default')."""
        return self.models.split(",") if self.models else [self.worker_model]

    @property
    def default_model(self) -> str:
        """The model of a request that names none."""
        return self.served_models()[0]

    @property
    def worker_model(self) -> str:
        """The model a worker serves (its queue: :meth:`queue_for`)."""
        return self.model or DEFAULT_MODEL

    def queue_for(self, model: str) -> str:
        """The RQ queue of a model's jobs: ``queue_name`` for the model named 'default' (every
        single-model deployment keeps its queue, and KEDA its list), ``<queue_name>-<model>`` else."""
        return self.queue_name if model == DEFAULT_MODEL else f"{self.queue_name}-{model}"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or self.data_dir.resolve().as_uri()

    def tenant_keys(self) -> dict[str, str]:
        """API key → tenant. Empty when no keys are configured (single-tenant, loopback only)."""
        raw = ""
        if self.api_keys is not None:
            raw += self.api_keys.get_secret_value()
        if self.api_keys_file is not None:
            try:
                raw += "," + self.api_keys_file.read_text()
            except OSError as exc:
                raise ValueError(f"cannot read MEGASR_API_KEYS_FILE {self.api_keys_file}: {exc.strerror}") from None
        keys: dict[str, str] = {}
        for entry in raw.replace("\n", ",").split(","):
            entry = entry.strip()
            if not entry:
                continue
            tenant, sep, key = entry.partition(":")
            if not sep or not tenant.strip() or len(key.strip()) < 8:
                raise ValueError("MEGASR_API_KEYS entries must look like tenant:key with keys of 8+ characters")
            keys[key.strip()] = tenant.strip()
        return keys


def _model_name(name: str, setting: str) -> str:
    if not re.fullmatch(MODEL_NAME_PATTERN, name):
        raise ValueError(
            f"{setting}: {name!r} is not a model name (1-63 of a-z, 0-9, '.', '_', '-'; "
            "starting with a letter or digit)"
        )
    return name


@lru_cache
def get_settings() -> Settings:
    return Settings()
