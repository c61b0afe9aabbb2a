#!/usr/bin/env bash
# Installs the Debian packages Herald's embedded stack needs, when they are missing:
# PostgreSQL and Redis servers, python3-venv, Prometheus (its promtool checks the alert rules),
# ClickHouse (the optional statistics backend's tests) and Node.js with npm (the Kubernetes
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

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "Missing packages: ${missing[*]} - install them as root (apt-get install ${missing[*]})." >&2
    exit 1
  fi
fi
echo "Installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
