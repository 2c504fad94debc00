# wmb: one image for every daemon (`wmb run --dc X` supervises a datacenter's daemons) and for the
# link emulator (`python -m wmb.linkemu`, see docker-compose.yml).
#
#   docker build -t wmb:local .
#   docker run --rm wmb:local config check /etc/wmb/topology.yaml   # with the file mounted there
#
# Two stages: the first builds a wheel of this repository, the second installs it (and its pinned
# dependencies, all of which ship manylinux wheels: no compiler in the final image) into a slim
# Python and runs as an unprivileged user.

FROM python:3.11-slim AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY wmb ./wmb
COPY binlog_capture ./binlog_capture
COPY broker ./broker
COPY cache_updater ./cache_updater
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WMB_TOPOLOGY=/etc/wmb/topology.yaml \
    WMB_HEALTH_PORT=9400
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels \
    && groupadd --system --gid 10001 wmb \
    && useradd --system --uid 10001 --gid wmb --home-dir /var/lib/wmb --create-home --shell /usr/sbin/nologin wmb \
    && mkdir -p /etc/wmb
WORKDIR /var/lib/wmb
USER 10001:10001

# /health answers 200 while every daemon the supervisor started runs, 503 otherwise (and nothing
# listens before it is up).  The port is the datacenter's metrics_port_base: set WMB_HEALTH_PORT
# to it (docker-compose.yml overrides the check per service instead).
HEALTHCHECK --interval=15s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('WMB_HEALTH_PORT', '9400'), timeout=5)"]

# SIGTERM (docker stop's default) makes the supervisor drain every daemon; give it the time
# (`docker stop -t 30`, stop_grace_period in compose).
STOPSIGNAL SIGTERM
ENTRYPOINT ["wmb"]
CMD ["--help"]
