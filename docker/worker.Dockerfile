# syntax=docker/dockerfile:1
# MegaSR GPU worker: CUDA runtime with torch, the MegaSR package, no weights inside
# (mounted at /weights or fetched by an init container). Expected size ≈ 7-8 GB, nearly all of
# it the PyTorch CUDA runtime base (CUDA, cuDNN, torch); MegaSR adds diffusers, transformers,
# peft and the service libraries (~300 MB).

FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md /src/
COPY megasr_core /src/megasr_core
COPY service /src/service
COPY worker /src/worker
# torch is already in the base image (a CUDA build); pip keeps it.
RUN python -m venv --system-site-packages /opt/venv && /opt/venv/bin/pip install /src

FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 MEGASR_HOME=/var/lib/megasr MEGASR_WEIGHTS=/weights \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUN groupadd --system --gid 10001 megasr \
    && useradd --system --uid 10001 --gid megasr --home-dir /var/lib/megasr --create-home megasr
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
EXPOSE 9100
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9100/readyz', timeout=3).status == 200 else 1)"]
CMD ["megasr", "worker", "--metrics-port", "9100"]
