#!/usr/bin/env bash
# Installs the Debian packages Herald's embedded stack needs, when they are missing:
# PostgreSQL and Redis servers, python3-venv, Prometheus (its promtool checks the alert rules),
# ClickHouse (the optional statistics backend's tests) and Node.js >= 20 with npm (the Kubernetes
# manifests' CRD validator, tests/deploy/crd).
# Idempotent; does nothing when all are there. (On a machine with systemd, Debian's prometheus
# package also starts a Prometheus service on :9090; Herald's tests run their own on a free port.)
set -euo pipefail

# Extra packages may be named on the command line (e.g. `wrk` for make bench).
missing=()
for extra in "$@"; do
  command -v "$extra" >/dev/null 2>&1 || missing+=("$extra")
done
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
# Prometheus and promtool: the alert rules' checks and the observability test (deploy/prometheus).
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
# Node.js and npm: the CRD validator of the Kubernetes manifests' tests (tests/deploy/crd).
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
# ClickHouse server (bookworm: 18.16.1) for the optional statistics backend's tests (docs/clickhouse.md).
[ -x /usr/sbin/clickhouse-server ] || command -v clickhouse-server >/dev/null 2>&1 || missing+=(clickhouse-server)

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
    echo "Missing packages: ${missing[*]} - install them as root (apt-get install ${missing[*]})." >&2
    exit 1
  fi
  echo "Installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The CRD validator (tests/deploy/crd) needs Node.js >= 20 (what it was tested on; the minimum checked here and in
# tests/deploy/conftest.py); Debian bookworm's nodejs is 18. An older node is replaced by Node 22
# (Node 20 reached end of life on 2026-04-30, and the pinned npm packages declare node >= 22): the
# npm registry's `node@22` package, Node's own Linux binaries, which `npm install -g` puts into
# npm's global prefix (`npm prefix -g`/bin, usually /usr/local/bin, which comes before /usr/bin on
# PATH, so it shadows the distribution's node).
NODE_MAJOR_MIN=20
NODE_MAJOR_INSTALL=22
node_major() { node --version 2>/dev/null | sed -n 's/^v\([0-9][0-9]*\)\..*/\1/p'; }
major="$(node_major)"
if [ -z "$major" ] || [ "$major" -lt "$NODE_MAJOR_MIN" ]; then
  if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
    echo "Node.js ${major:+$major }is older than $NODE_MAJOR_MIN (tests/deploy/crd needs Node >= $NODE_MAJOR_MIN):" \
      "install one as root (npm install -g node@$NODE_MAJOR_INSTALL)." >&2
    exit 1
  fi
  echo "Node.js $(node --version 2>/dev/null || echo missing) < $NODE_MAJOR_MIN: installing node@$NODE_MAJOR_INSTALL from the npm registry"
  $SUDO npm install -g --no-audit --no-fund --loglevel=error "node@$NODE_MAJOR_INSTALL"
  hash -r
  major="$(node_major)"
  if [ -z "$major" ] || [ "$major" -lt "$NODE_MAJOR_MIN" ]; then
    echo "Node.js >= $NODE_MAJOR_MIN is required (tests/deploy/crd), but \`node\` on PATH ($(command -v node)) is" \
      "$(node --version 2>/dev/null || echo missing) after npm install -g node@$NODE_MAJOR_INSTALL (installed under" \
      "$(npm prefix -g)/bin): put that first on PATH, or install Node.js >= $NODE_MAJOR_MIN yourself." >&2
    exit 1
  fi
fi
