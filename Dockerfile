# syntax=docker/dockerfile:1
# The facerec REST service. One file, two variants (docs/deployment.md):
#   docker build -t facerec:cuda .                         CUDA 13 + onnxruntime-gpu (extra "gpu")
#   docker build -t facerec:cpu --build-arg VARIANT=cpu .  CPU + onnxruntime (extra "cpu")
# Both install the exact versions CI tests (constraints.txt) and carry models/default. Configuration
# is by FACEREC_* environment variables (docs/operations.md); API keys come from the environment or a
# mounted file (FACEREC_API_KEYS_FILE), never from the image.

ARG VARIANT=cuda
# The CUDA major must match onnxruntime-gpu's and torch's (13 for the pins in constraints.txt).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG CPU_IMAGE=python:3.12-slim-bookworm

# ---------------------------------------------------------------- the two operating-system bases
FROM ${CUDA_IMAGE} AS os-cuda
# Ubuntu's python3 follows the release's security updates; pinning its exact build would break the
# build at every point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# Strict device: a container started without a GPU stops with an error, it never serves on the CPU.
ENV FACEREC_DEVICE=cuda

FROM ${CPU_IMAGE} AS os-cpu
ENV FACEREC_DEVICE=cpu

# ---------------------------------------------------------------- build: a virtual environment
# os-${VARIANT} is one of the two stages above, not an untagged image (hadolint cannot tell).
# hadolint ignore=DL3006
FROM os-${VARIANT} AS build
ARG VARIANT
# Empty: torch from PyPI, the build CI tests. A CPU image can be ~3 GB smaller with the CPU-only
# build: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_URL=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY facerec ./facerec
COPY service ./service
COPY training ./training
# The extra follows the variant: onnxruntime-gpu and onnxruntime must never share an environment.
# torch first (it brings the pinned setuptools), then the project built against that setuptools.
RUN set -eu; \
    case "${VARIANT}" in \
        cuda) extra=gpu ;; \
        cpu) extra=cpu ;; \
        *) echo "VARIANT must be cuda or cpu, not '${VARIANT}'" >&2; exit 1 ;; \
    esac; \
    if [ -n "${TORCH_INDEX_URL}" ]; then \
        /opt/venv/bin/pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX_URL}" \
            -c constraints.txt torch torchvision; \
    fi; \
    /opt/venv/bin/pip install --no-cache-dir -c constraints.txt torch torchvision; \
    /opt/venv/bin/pip install --no-cache-dir --no-build-isolation -c constraints.txt ".[serve,search,${extra}]"; \
    /opt/venv/bin/pip check

# ---------------------------------------------------------------- runtime
# hadolint ignore=DL3006
FROM os-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="facerec" \
      org.opencontainers.image.description="Face verification, quality and OOD scoring over HTTP" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.variant="${VARIANT}"
RUN groupadd --system --gid 10001 facerec \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin facerec \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/facerec
# Everything below stays owned by root and read-only for the service user.
COPY --from=build /opt/venv /opt/venv
COPY models/default /opt/facerec/models/default
COPY --chmod=0755 deploy/docker-entrypoint.sh /usr/local/bin/facerec-entrypoint
COPY --chmod=0755 deploy/healthcheck.py /usr/local/bin/facerec-healthcheck
# The only writable paths are the two volumes: /tmp (uploads spooled by the multipart parser,
# torch.compile caches; a tmpfs or emptyDir) and /var/lib/facerec (SQLite galleries; a named volume
# or PersistentVolume). The root filesystem can be mounted read-only.
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    FACEREC_MODEL=/opt/facerec/models/default \
    FACEREC_GALLERY_PATH=/var/lib/facerec/galleries.sqlite3 \
    FACEREC_HOST=0.0.0.0 \
    FACEREC_PORT=8000
VOLUME ["/tmp", "/var/lib/facerec"]
WORKDIR /opt/facerec
USER 10001:10001
EXPOSE 8000
# Readiness, not liveness: healthy once the model is loaded, its provider active and warm-up done
# (GET /v1/health/ready, deploy/healthcheck.py).
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 CMD ["facerec-healthcheck"]
ENTRYPOINT ["facerec-entrypoint"]
CMD ["facerec-serve"]
