# token-sidecar container image.
#
#   docker build -t token-sidecar:0.1.0 .
#
# Runs as uid:gid 10001:10001 and writes only under /run/token-sidecar
# (mount a tmpfs or emptyDir there when the root file system is read-only).
# Every run-time command is in exec form: nothing needs a shell.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY sidecar/ sidecar/
# The versions in constraints.txt were tested together; pip compiles the
# byte code here, so the read-only image never needs to write any.
RUN python -m venv /opt/token-sidecar \
    && /opt/token-sidecar/bin/pip install --constraint constraints.txt \
        '.[uvloop]' \
    && /opt/token-sidecar/bin/pip uninstall --yes pip


FROM ${PYTHON_IMAGE}

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="token-sidecar" \
      org.opencontainers.image.description="Fetch one OAuth2 client-credentials token, keep it fresh, serve it on loopback." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# A fixed numeric user, so that Kubernetes' runAsNonRoot can verify it and
# file permissions on mounted secrets can be planned.
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin sidecar \
    && install -d -m 0700 -o 10001 -g 10001 /run/token-sidecar

COPY --from=build /opt/token-sidecar /opt/token-sidecar
COPY deploy/image/config.toml /etc/token-sidecar/config.toml

ENV PATH="/opt/token-sidecar/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SIDECAR_CONFIG=/etc/token-sidecar/config.toml \
    RUNTIME_DIRECTORY=/run/token-sidecar

USER 10001:10001
WORKDIR /run/token-sidecar
# The ops port (/healthz, /readyz, /metrics). /token (8787) stays on the
# container's loopback and is deliberately not exposed.
EXPOSE 9464
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["token-sidecar", "health"]
ENTRYPOINT ["token-sidecar"]
CMD ["run"]
