#!/usr/bin/env bash
# Set up (see setup.sh) and run `pgoom watch` with any options given, as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pgoom watch "$@"
