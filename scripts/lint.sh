#!/usr/bin/env bash
# Lint and type-check: the same commands locally and in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check watcher tests scripts
.venv/bin/ruff format --check watcher || { echo "run: .venv/bin/ruff format watcher" >&2; exit 1; }
.venv/bin/mypy
