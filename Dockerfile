# syntax=docker/dockerfile:1
# LogPose in a container: HTTP API on 8470/tcp, DNS on 8653/udp and 8653/tcp,
# data in the volume /var/lib/logpose.
#
#   docker build -t logpose .
#   docker run -d --name logpose -p 8470:8470 -p 8653:8653/udp -p 8653:8653 \
#       -v logpose-data:/var/lib/logpose logpose
#   docker exec logpose cat /var/lib/logpose/admin.secret
#
# Settings are LOGPOSE_* variables (docker run -e, or --env-file with a copy of
# conf/logpose.env), or a TOML file mounted into the container and passed as
# arguments: docker run ... logpose --config /etc/logpose/logpose.toml

# Build stage: the LogPose wheel and the wheels of all its dependencies.
FROM python:3.11-slim-bookworm AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY logpose ./logpose
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Runtime stage: only Python and the installed wheels, no build tools.
FROM python:3.11-slim-bookworm
# A fixed numeric UID and GID, so the owner of files in the volume is known on
# the host and USER passes a runAsNonRoot check without a passwd lookup.
RUN groupadd --system --gid 10470 logpose \
    && useradd --system --uid 10470 --gid logpose --home-dir /var/lib/logpose --no-create-home \
        --shell /usr/sbin/nologin logpose \
    && install -d -o logpose -g logpose -m 0750 /var/lib/logpose
# The wheels are bind-mounted from the build stage, so they add no layer here.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/logpose-*.whl

# Inside the container the server listens on every address; docker run -p
# decides what is reachable from outside.
ENV PYTHONDONTWRITEBYTECODE=1 \
    LOGPOSE_HTTP_LISTEN=0.0.0.0:8470 \
    LOGPOSE_DNS_LISTEN=0.0.0.0:8653 \
    LOGPOSE_DATA_DIR=/var/lib/logpose

USER 10470:10470
VOLUME /var/lib/logpose
EXPOSE 8470/tcp 8653/udp 8653/tcp

# python:3.11-slim has no curl, so urllib requests /healthz at LOGPOSE_HTTP_LISTEN,
# with a wildcard address replaced by loopback. A refused connection, a timeout
# or a status other than 2xx raises, and python exits 1: unhealthy.
# NOTE: a server configured for HTTPS (tls_cert) needs a check that speaks TLS.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; host, _, port = os.environ.get('LOGPOSE_HTTP_LISTEN', '127.0.0.1:8470').rpartition(':'); host = {'0.0.0.0': '127.0.0.1', '[::]': '[::1]'}.get(host, host); urllib.request.urlopen(f'http://{host}:{port}/healthz', timeout=4)"]

ENTRYPOINT ["logpose-server"]
