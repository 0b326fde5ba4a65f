#!/usr/bin/env bash
# Set up, lint, type-check and run every test: the unit tests on Python 3.9 where it exists,
# then as root the Docker image end to end and the OOM harness (short mode: real memcg OOM
# kills), and last pytest (unit, then integration on the real kernel with real PostgreSQL).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
bash scripts/py39-smoke.sh
if [ "$(id -u)" -eq 0 ]; then
  bash scripts/docker-e2e.sh
  bash scripts/oom-harness.sh --mode short --out results/oom-harness
fi
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
