# The lyrics service: CPU torch by default.
#   docker build -t lyrics .
#   docker run --rm -p 8000:8000 lyrics
# CUDA: a CUDA build of torch (its wheels bring the CUDA runtime; the host needs the NVIDIA driver
# and container toolkit, then `docker run --gpus all`):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 -t lyrics:cuda .
# BASE_IMAGE swaps the base image: any Debian-based image with python3 (3.11) and its venv module.
# Offline builds: PIP_FIND_LINKS names a folder or URL of wheels (pip download -r requirements-serve.txt,
# the torch wheel, setuptools) with PIP_NO_INDEX=1 and an empty TORCH_INDEX (tests/deploy/test_image.py).
ARG BASE_IMAGE=python:3.11-slim

# ---- builder: a virtualenv with the dependencies, then the project (its install builds the C kernels)
FROM ${BASE_IMAGE} AS builder

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG PIP_FIND_LINKS=
ARG PIP_NO_INDEX=

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# the C compiler and Python's headers build the kernels; they stay in this stage
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev python3-dev \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/lyrics
ENV PATH=/opt/lyrics/bin:$PATH

# the dependencies before the code, so a code change does not reinstall them: torch from its own
# index (CPU or CUDA build), everything else exactly as locked, hashes checked (hadolint misreads the
# optional --index-url as an unpinned package)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==${TORCH_VERSION}"
COPY requirements-serve.txt /tmp/
RUN pip install --no-cache-dir --require-hashes -r /tmp/requirements-serve.txt

# the project, without the checkpoints (they go to /models below) and without its dependencies (above)
WORKDIR /src
COPY pyproject.toml setup.py README.md lyrics_cli.py ./
COPY app/ ./app/
COPY training/ ./training/
COPY model_store/*.py model_store/*.c ./model_store/
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-deps . \
    && python -P -c "from model_store import kernels; assert kernels.library(), 'the C kernels were not built'"

# ---- runtime: the virtualenv and the models; no compiler, no sources
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/lyrics/bin:$PATH

COPY --from=builder /opt/lyrics /opt/lyrics
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin lyrics
COPY --chown=10001:10001 model_store/checkpoints/ /models/

USER 10001
WORKDIR /home/lyrics

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
