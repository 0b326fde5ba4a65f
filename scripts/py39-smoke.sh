#!/usr/bin/env bash
# pgoom must run on the Percona image's python3 (3.9). Where a 3.9 interpreter exists on this
# machine, build a 3.9 environment and run the unit tests and the CLI's bad-input paths on it;
# where none exists, say so and skip (ruff and mypy still target 3.9 everywhere).
set -euo pipefail
cd "$(dirname "$0")/.."
PY39=${PY39:-}
found=
for candidate in "$PY39" /root/.pyenv/versions/3.9.*/bin/python3.9 /usr/bin/python3.9 python3.9; do
  [ -n "$candidate" ] || continue
  # pyenv puts a shim named python3.9 on PATH that fails when 3.9 is not selected: run it.
  if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 9)' >/dev/null 2>&1; then
    found=$candidate; break
  fi
done
PY39=$found
if [ -z "$PY39" ]; then
  echo "py39-smoke: no python3.9 on this machine, skipped"
  exit 0
fi
if [ ! -x .venv39/bin/python ]; then
  "$PY39" -m venv .venv39
fi
stamp=.venv39/.pgoom-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv39/bin/pip install -q --upgrade pip >/dev/null
  .venv39/bin/pip install -q -e . pytest >/dev/null
  touch "$stamp"
fi
.venv39/bin/python --version
.venv39/bin/python -m watcher --help >/dev/null
# Option declarations and their PGOOM_* variables must survive the 3.9 typer (regression:
# string annotations made typer < 0.24 ignore them, turning --json into --json-output).
.venv39/bin/python -m watcher status --json >/dev/null
set +e
out=$(PGOOM_SCORE=5000 .venv39/bin/python -m watcher watch --log-file '' 2>&1); rc=$?
set -e
if [ "$rc" -ne 2 ] || [ "$out" != "pgoom: --score 5000 is out of range: use a value from -1000 to 1000" ]; then
  echo "py39-smoke: PGOOM_SCORE not honoured on 3.9 (exit $rc): $out" >&2
  exit 1
fi
.venv39/bin/python -m pytest -q -p no:cacheprovider tests/unit
