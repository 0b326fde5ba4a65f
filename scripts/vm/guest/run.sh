#!/bin/sh
# Inside the guest (root, from pgoom-vmtest.service): install this checkout's pgoom from the
# work disk's wheelhouse (no network) where deploy/systemd/pgoom.service expects it, then
# run the suite. WORK (argument 1) is the mounted work disk: src/, wheels/, mode, results/.
work=${1:?usage: run.sh WORK}
mode=$(cat "$work/mode")
only=$(cat "$work/only" 2>/dev/null)
results="$work/results"
mkdir -p "$results"
t0=$(date +%s)
# The venv itself is in the image (created at build time, natively: ensurepip costs
# minutes under emulation); --no-compile for the same reason (imports compile lazily).
/opt/pgoom/bin/pip install -q --no-index --no-compile --disable-pip-version-check \
  --find-links "$work/wheels" pgoom pytest >"$results/install.log" 2>&1
rc=$?
echo "vm-suite: pgoom installed offline in $(($(date +%s) - t0)) s (exit $rc)"
if [ $rc -ne 0 ]; then
  cat "$results/install.log"
  printf '[{"name": "install pgoom offline from the wheelhouse", "passed": false, "figures": {"exit": %s}}]\n' "$rc" > "$results/summary.json"
  exit 1
fi
# Runs per guard check in full mode (vm-test.sh checked they are numbers; empty: defaults).
PGOOM_VM_GUARD_RUNS=$(cat "$work/guard_runs" 2>/dev/null)
PGOOM_VM_GUARD_BASELINE_RUNS=$(cat "$work/guard_baseline_runs" 2>/dev/null)
export PGOOM_VM_GUARD_RUNS PGOOM_VM_GUARD_BASELINE_RUNS
cd "$work/src" || exit 1
set -- --mode "$mode" --out "$results" --src "$work/src"
[ -n "$only" ] && set -- "$@" --only "$only"
/opt/pgoom/bin/python -m scripts.vm.guest "$@"
