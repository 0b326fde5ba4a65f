#!/usr/bin/env bash
# Set up, lint, type-check and run every test: the unit tests on Python 3.9 where it exists,
# then as root the Docker image end to end, the OOM harness (short mode: real memcg OOM
# kills) and the VM test bed where its image is cached, and last pytest (unit, then
# integration on the real kernel with real PostgreSQL).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
bash scripts/py39-smoke.sh
if [ "$(id -u)" -eq 0 ]; then
  bash scripts/docker-e2e.sh
  bash scripts/oom-harness.sh --mode short --out results/oom-harness
  # The VM test bed (docs/vm-test.md) only where its guest image is already cached: a cold
  # build plus the short suite under TCG would take CI past its budget.
  if bash scripts/vm/build-base.sh "${PGOOM_VM_CACHE:-/var/tmp/pgoom-vm}" --cached >/dev/null; then
    bash scripts/vm-test.sh --mode short --out results/vm
  else
    echo "vm-test: skipped: no cached guest image (warm it once: bash scripts/vm-test.sh; docs/vm-test.md)"
  fi
fi
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
