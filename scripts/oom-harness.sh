#!/usr/bin/env bash
# One command for the OOM harness: set up (PostgreSQL, .venv), then run it as root.
#   bash scripts/oom-harness.sh                      # short mode into results/
#   bash scripts/oom-harness.sh --mode full          # what docs/oom-harness.md shows
#   bash scripts/oom-harness.sh --score -900 --children-score 0 --launcher-score 0
#                                                    # a host with CAP_SYS_RESOURCE
# Exit status: 0 pass, 1 a protected run lost its postmaster or committed rows (or another
# check failed: see the summary line), 2 this host cannot run it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "oom-harness: run as root (it creates memory cgroups and runs PostgreSQL as uid 26)" >&2
  exit 2
fi
bash scripts/setup.sh
case " $* " in
  *" --out "*|*" --out="*) exec .venv/bin/python -m scripts.oomharness "$@" ;;
  *) exec .venv/bin/python -m scripts.oomharness --out results "$@" ;;
esac
