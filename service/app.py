"""``create_app``: assemble the FastAPI app from settings (routers, error handlers, services)."""

from __future__ import annotations

import redis
from fastapi import FastAPI

from .anonymity import refuse_accidental_anonymity
from .config import Settings, get_settings
from .deps import Services
from .errors import install_error_handlers
from .hosts import TrustedHosts, allowed_hosts
from .jobs import JobStore
from .metrics import install_metrics
from .queue import JobQueue
from .redis_health import warn_without_persistence
from .routes import health, jobs, models, web
from .storage import storage_from_url
from .tracing import TracingMiddleware


def build_services(settings: Settings) -> Services:
    if not settings.redis_url:
        raise ValueError("MEGASR_REDIS_URL is not set (megasr serve starts an embedded Valkey when it is unset)")
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30)
    storage = storage_from_url(settings.resolved_storage_url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                               public_endpoint_url=settings.s3_public_url, addressing_style=settings.s3_addressing_style)
    return Services(
        settings=settings, redis=client, storage=storage,
        jobs=JobStore(client, result_ttl_s=settings.result_ttl_s),
        queues={name: JobQueue(client, settings.queue_for(name), settings.job_timeout_s)
                for name in settings.served_models()},
        tenant_keys=settings.tenant_keys(),
    )


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    """The API app; refuses (``InsecureConfiguration``) to start without keys unless ``allow_anonymous``."""
    services = services or build_services(settings or get_settings())
    refuse_accidental_anonymity(services.settings, services.tenant_keys)
    app = FastAPI(
        title="MegaSR",
        version="0.1.0",
        description="Real-world image super-resolution (MegaSR) as a job queue: submit, poll, fetch.",
        docs_url=None,  # routes.web serves /docs with vendored Swagger UI assets (no CDN)
        redoc_url=None,  # ReDoc would load a CDN script onto the origin whose page keeps the key
    )
    app.state.services = services
    install_error_handlers(app)
    install_metrics(app, app.state.services)
    warn_without_persistence(app.state.services.redis)  # accepted jobs die with a Redis that keeps nothing
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(models.router)
    app.include_router(web.router)
    app.mount(web.STATIC_PREFIX, web.WebAssets(), name="static")
    app.add_middleware(web.HtmlSecurityHeaders)  # a CSP on every HTML answer, whichever route made it
    if (hosts := allowed_hosts(app.state.services.settings)) is not None:
        app.add_middleware(TrustedHosts, hosts=hosts)
    app.add_middleware(TracingMiddleware)  # outermost: one server span per request (a no-op while tracing is off)
    return app
