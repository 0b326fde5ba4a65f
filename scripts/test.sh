#!/usr/bin/env bash
# Set up, lint, type-check and run every test (unit, then integration on the real kernel
# with real PostgreSQL: run as root). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
bash scripts/py39-smoke.sh
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
[ "$(id -u)" -ne 0 ] || bash scripts/oom-harness.sh --mode short --out results/oom-harness  # real memcg OOM kills (root)
