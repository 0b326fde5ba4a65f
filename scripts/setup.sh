#!/usr/bin/env bash
# Installs what pgoom's development, tests and CI need on a fresh Debian machine of this
# kind, and only what is missing: Debian's PostgreSQL and util-linux tools, and the Python
# environment in .venv (the project in editable mode with its dev tools).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need_apt+=(postgresql postgresql-contrib)
command -v unshare >/dev/null 2>&1 || need_apt+=(util-linux)
command -v setpriv >/dev/null 2>&1 || need_apt+=(util-linux)
command -v capsh >/dev/null 2>&1 || need_apt+=(libcap2-bin)
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client)
# The attack tests hold the real server binary in a preloaded library's constructor,
# compiled at test time (tests/integration/test_attacks.py).
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install: ${need_apt[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # Debian starts a default cluster on install; the tests run their own.
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    for conf in /etc/postgresql/*/*/postgresql.conf; do
      [ -e "$conf" ] || continue
      v=$(basename "$(dirname "$(dirname "$conf")")"); c=$(basename "$(dirname "$conf")")
      pg_ctlcluster "$v" "$c" stop >/dev/null 2>&1 || true
    done
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.pgoom-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
