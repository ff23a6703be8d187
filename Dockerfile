# syntax=docker/dockerfile:1
# olora-serve image. GPU (default):  docker build -t olora-serve:0.1.0 .
#                   CPU only:       docker build --build-arg TORCH_VARIANT=cpu -t olora-serve:0.1.0-cpu .
# Build args: TORCH_VARIANT=cuda|cpu picks the base; CUDA_WHEELS=cu128 picks PyTorch's CUDA wheel index
# (it must match the CUDA base image's major version; see docs/deploy.md). Secrets are never baked in:
# OLORA_API_KEYS / OLORA_ADMIN_KEYS come from the environment at run time. Without them the server refuses to
# bind 0.0.0.0 (OLORA_ALLOW_PUBLIC_WITHOUT_KEYS=true overrides that, for a private network only).

ARG TORCH_VARIANT=cuda
# Pinned bases. The CUDA base must match the CUDA major version of CUDA_WHEELS (cu128 -> 12.x, cu130 -> 13.x).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm

# ---- operating system + Python 3.12, one per variant ----------------------------------------------------
# Ubuntu 24.04 rather than 22.04: olora-serve needs Python >= 3.11, and 22.04 ships 3.10.
FROM ${CUDA_IMAGE} AS os-cuda
ARG CUDA_WHEELS=cu128
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/${CUDA_WHEELS}
# Python comes from the pinned base's own archive; its packages follow Ubuntu's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/python3.12 /usr/local/bin/python

FROM ${PYTHON_IMAGE} AS os-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# The base chosen by the build arg: one of the two pinned stages above (hadolint cannot see through the arg).
# hadolint ignore=DL3006
FROM os-${TORCH_VARIANT} AS os
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# ---- builder: a virtualenv with torch from PyTorch's index and olora-serve from the source ---------------
FROM os AS builder
# TORCH_FIND_LINKS: a folder of torch wheels mounted into the build (`podman build -v DIR:/wheels:ro
# --build-arg TORCH_FIND_LINKS=/wheels`) for machines that cannot reach PyTorch's index; its dependencies
# then come from PyPI. scripts/container_test.sh builds the CPU variant that way.
ARG TORCH_FIND_LINKS=""
# torch first, from the CUDA (or CPU) index: the PyPI resolution of the project then finds it satisfied.
RUN python -m venv /opt/venv \
    && if [ -n "${TORCH_FIND_LINKS}" ]; then export PIP_FIND_LINKS="${TORCH_FIND_LINKS}"; \
       else export PIP_INDEX_URL="${TORCH_INDEX_URL}"; fi \
    && pip install --no-cache-dir torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY olora_core ./olora_core
COPY app ./app
# boto3: pyproject's `s3` extra (the object-store sources), named with its pin (hadolint DL3013 cannot read `.[s3]`)
RUN pip install --no-cache-dir . boto3==1.44.5 \
    && python -c "import torch, boto3, app.server.main, olora_core; print('torch', torch.__version__)"

# ---- runtime ---------------------------------------------------------------------------------------------
FROM os AS runtime
LABEL org.opencontainers.image.title="olora-serve" \
      org.opencontainers.image.description="Many OLoRA/LoRA adapters on one base model (TGI/LoRAX/OpenAI API)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"

RUN groupadd --system --gid 10001 olora \
    && useradd --system --uid 10001 --gid olora --home-dir /home/olora --create-home --shell /usr/sbin/nologin olora \
    && mkdir -p /data/adapters /data/hf-cache \
    && chown -R 10001:10001 /data

COPY --from=builder /opt/venv /opt/venv

# The model cache and the adapter store are volumes: the adapter store is shared by all replicas (see
# docs/scaling.md), the model cache survives restarts. HOME and caches point at writable places, so the
# container also runs with a read-only root filesystem (Kubernetes mounts an emptyDir on /tmp).
ENV HOME=/home/olora \
    HF_HOME=/data/hf-cache \
    XDG_CACHE_HOME=/tmp/.cache \
    OLORA_ADAPTER_DIR=/data/adapters \
    OLORA_HOST=0.0.0.0 \
    OLORA_PORT=8000
VOLUME ["/data/hf-cache", "/data/adapters"]
WORKDIR /home/olora
USER 10001:10001
EXPOSE 8000

# /health answers once the model is loaded (uvicorn starts listening after the lifespan); a large model
# takes minutes to download and load, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('OLORA_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["olora", "serve"]
