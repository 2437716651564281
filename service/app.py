"""``create_app``: assemble the FastAPI app from settings (routers, error handlers, services).

The services themselves (Redis, storage, the job store and queues) are the job system's
(``service.jobsystem.services``); this module only puts the HTTP layer around them.
"""

from __future__ import annotations

from fastapi import FastAPI

from .anonymity import refuse_accidental_anonymity
from .config import Settings, get_settings
from .errors import install_error_handlers
from .hosts import TrustedHosts, allowed_hosts
from .jobsystem.services import Services, build_services
from .prometheus import install_metrics
from .redis_health import warn_without_persistence
from .request_limits import ReadSlots
from .routes import health, jobs, models, web
from .tracing import TracingMiddleware


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
    #: GETs per tenant in flight in this process (MEGASR_MAX_CONCURRENT_READS_PER_TENANT): ``deps.limit_reads``
    app.state.read_slots = ReadSlots(services.settings.max_concurrent_reads_per_tenant)
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
