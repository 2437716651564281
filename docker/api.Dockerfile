# syntax=docker/dockerfile:1
# MegaSR API image: FastAPI on slim Python, no CUDA and no torch (the API never imports them).
# Expected size ≈ 190 MB (python:3.11-slim ≈ 130 MB + ~60 MB of wheels).

FROM python:3.11.10-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The hashed lock of docker/requirements-api.txt (regenerate with docker/lock.sh).
COPY docker/api.lock.txt /src/docker/api.lock.txt
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-deps --require-hashes -r docker/api.lock.txt
COPY pyproject.toml README.md /src/
COPY service /src/service
COPY worker /src/worker
COPY megasr_core /src/megasr_core
COPY client /src/client
# --no-deps: only the service's own requirements above, not torch and the model stack.
RUN /opt/venv/bin/pip install --no-deps /src

FROM python:3.11.10-slim-bookworm
# FORWARDED_ALLOW_IPS (read by uvicorn): the proxies whose X-Forwarded-For/-Proto are believed, as
# addresses or CIDRs. uvicorn takes the client as the first X-Forwarded-For address, from the right,
# that is not one of them, so the proxy must append to the header. The client address feeds the
# failed-authentication limit (wrong keys only), so no wildcard: set it to your load balancer /
# ingress range. The app refuses to start without MEGASR_API_KEYS(_FILE) unless MEGASR_ALLOW_ANONYMOUS=1.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 MEGASR_HOME=/var/lib/megasr FORWARDED_ALLOW_IPS=127.0.0.1
RUN groupadd --system --gid 10001 megasr \
    && useradd --system --uid 10001 --gid megasr --home-dir /var/lib/megasr --create-home megasr
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
# uvicorn with --proxy-headers, the connection limits (MEGASR_HEADER_TIMEOUT_S, MEGASR_KEEPALIVE_TIMEOUT_S,
# MEGASR_MAX_CONNECTIONS) and the megasr log handler: the same server options as `megasr serve`.
CMD ["python", "-m", "service.api_server", "--host", "0.0.0.0", "--port", "8000"]
