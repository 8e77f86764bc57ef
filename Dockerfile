# gpubroker image: one image for the dispatcher, the node workers and Flower.
#
#   docker build -t gpubroker .
#   docker run --rm gpubroker                       # gpubroker --help
#   docker build --build-arg BASE_IMAGE=my-registry/python:3.11-slim -t gpubroker .
#
# BASE_IMAGE may be any Debian-based image with Python >= 3.11 and pip on PATH, so a locally
# built or mirrored base can stand in where Docker Hub is not reachable. (No '# syntax=' line on
# purpose: it would make BuildKit pull a frontend image from Docker Hub too.)
ARG BASE_IMAGE=python:3.11-slim

# ---- build: turn the source tree into a wheel (nothing of the source stays in the image) ----
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
COPY broker ./broker
COPY workers ./workers
RUN python -m pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime ----
FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 gpubroker \
    && useradd --system --uid 10001 --gid gpubroker --home-dir /home/gpubroker --create-home \
       --shell /usr/sbin/nologin gpubroker

# A regular (non-editable) install of the wheel and its dependencies from the package index.
COPY --from=build /wheels /tmp/wheels
RUN python -m pip install /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels

# Deployable configuration (Flower's flowerconfig.py, Redis config, env example). Not a Python
# package: the code runs from site-packages, never from here.
WORKDIR /app
COPY config ./config

USER 10001:10001

# Flower's web UI and the dispatcher's Prometheus metrics (9808 unless GPUBROKER_METRICS_PORT says).
EXPOSE 5555 9808

CMD ["gpubroker", "--help"]
