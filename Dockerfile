# The lyrics service: CPU torch by default.
#   docker build -t lyrics .
#   docker run --rm -p 8000:8000 lyrics
# CUDA: a CUDA build of torch (its wheels bring the CUDA runtime; the host needs the NVIDIA driver
# and container toolkit, then `docker run --gpus all`):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 -t lyrics:cuda .
# BASE_IMAGE swaps the base image (it must provide python3.11+ and pip as `python` and `pip`).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# a C compiler for the fused recurrent-cell kernels (model_store/kernels.c), built when the package
# is installed (setup.py); without it the cells run as slower torch ops
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# torch first, from its own index: the largest layer, rebuilt only when its version changes
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# the project, without the checkpoints (they go to /models below), with what serving needs only
COPY pyproject.toml setup.py README.md lyrics_cli.py ./
COPY app/ ./app/
COPY training/ ./training/
COPY model_store/*.py model_store/*.c ./model_store/
# the versions are pinned in pyproject.toml; installing builds the C kernels (setup.py)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve]" \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin lyrics

COPY --chown=10001:10001 model_store/checkpoints/ /models/

USER 10001

# Mount your own checkpoints over /models (or point LYRICS_MODEL_DIR elsewhere):
#   docker run -v "$PWD/my-models:/models:ro" -p 8000:8000 lyrics
ENV LYRICS_MODEL_DIR=/models \
    LYRICS_HOST=0.0.0.0 \
    LYRICS_PORT=8000 \
    LYRICS_DEVICE=auto

EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LYRICS_PORT', '8000'), timeout=4)"]

CMD ["lyrics", "serve"]
