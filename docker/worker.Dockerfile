# syntax=docker/dockerfile:1
# MegaSR GPU worker: CUDA runtime with torch, the MegaSR package, no weights inside
# (mounted at /weights or fetched by an init container). Expected size ≈ 7-8 GB, nearly all of
# it the PyTorch CUDA runtime base (CUDA, cuDNN, torch); MegaSR adds diffusers, transformers,
# peft and the service libraries (~300 MB).

FROM pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The lock (docker/lock.sh) is resolved for this base image: its Python 3.11 and its torch,
# which (with the CUDA wheels torch brings) stays the base image's and is not in the lock.
RUN python -c "import sys, torch; assert sys.version_info[:2] == (3, 11), sys.version; print('torch', torch.__version__)"
COPY docker/worker.lock.txt /src/docker/worker.lock.txt
RUN python -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/pip install --no-deps --require-hashes -r docker/worker.lock.txt
COPY pyproject.toml README.md /src/
COPY megasr_core /src/megasr_core
COPY client /src/client
COPY service /src/service
COPY worker /src/worker
# --no-deps: everything else is the lock above.
RUN /opt/venv/bin/pip install --no-deps /src

FROM pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
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
