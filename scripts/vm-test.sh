#!/usr/bin/env bash
# The production-faithful test bed (docs/vm-test.md): a Debian bookworm VM with Debian's
# kernel, systemd as PID 1, cgroup v2 only, CAP_SYS_RESOURCE and PostgreSQL 15, with pgoom
# installed offline from a wheel of THIS checkout. Runs the in-guest suite
# (scripts/vm/guest) and brings its results back.
#   bash scripts/vm-test.sh [--mode short|full] [--out DIR]     (default: short, results/vm)
# Env: PGOOM_VM_CACHE (default /var/tmp/pgoom-vm: kernel, image, wheels, reused across runs),
#      PGOOM_VM_ACCEL=kvm|tcg (default: KVM where it boots, else TCG),
#      PGOOM_VM_ONLY=TEXT (run only the checks whose name contains TEXT; for development),
#      PGOOM_VM_GUARD_RUNS=N, PGOOM_VM_GUARD_BASELINE_RUNS=N (full mode: runs per guard
#      check, default 20, and per unguarded baseline, default 3; short mode runs 1).
# Output: DIR/summary.json, DIR/summary.md, DIR/console.log, DIR/logs/; last line
# "vm-test: PASS|FAIL (...)". Exit 0 every check passed, 1 a check failed or the guest did
# not report, 2 bad usage or this host cannot run it.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=short
out=results/vm
while [ $# -gt 0 ]; do
  case "$1" in
    --mode) mode=${2:-}; shift 2 ;;
    --mode=*) mode=${1#--mode=}; shift ;;
    --out) out=${2:-}; shift 2 ;;
    --out=*) out=${1#--out=}; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "vm-test: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$mode" in short|full) ;; *) echo "vm-test: --mode is short or full" >&2; exit 2 ;; esac
[ -n "$out" ] || { echo "vm-test: --out needs a directory" >&2; exit 2; }
for var in PGOOM_VM_GUARD_RUNS PGOOM_VM_GUARD_BASELINE_RUNS; do
  case "${!var:-1}" in
    *[!0-9]*|0*) echo "vm-test: $var is a number of runs, 1 or more" >&2; exit 2 ;;
  esac
done
if [ "$(id -u)" -ne 0 ]; then
  echo "vm-test: run as root (debootstrap, chroot)" >&2
  exit 2
fi
started=$(date +%s)
say() { echo "vm-test: $*"; }

# --- what the host needs --------------------------------------------------------------------
need_apt=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need_apt+=(qemu-system-x86)
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || need_apt+=(busybox-static)
command -v debugfs >/dev/null 2>&1 || need_apt+=(e2fsprogs)
command -v cpio >/dev/null 2>&1 || need_apt+=(cpio)
command -v zstd >/dev/null 2>&1 || need_apt+=(zstd)
command -v xz >/dev/null 2>&1 || need_apt+=(xz-utils)
if [ ${#need_apt[@]} -gt 0 ]; then
  say "installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
bash scripts/setup.sh

cache=${PGOOM_VM_CACHE:-/var/tmp/pgoom-vm}
mkdir -p "$cache"
# Bounded like everything else here: debootstrap over a slow mirror must not hang CI.
guest=$(timeout 1800 bash scripts/vm/build-base.sh "$cache" | sed -n 's/^guest=//p')
[ -f "$guest/root.img" ] || { echo "vm-test: no guest image built" >&2; exit 1; }
build_s=$(($(date +%s) - started))

run=$(mktemp -d "$cache/run.XXXXXX")
qemu_pid=
cleanup() {
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
    kill "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
  fi
  rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the per-run work disk: this checkout, its wheelhouse, the mode ---------------------------
stage="$run/stage"
mkdir -p "$stage/src" "$stage/wheels"
git ls-files -z -co --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null \
  | tar -xf - -C "$stage/src"
timeout 900 bash scripts/vm/wheelhouse.sh "$cache" "$stage/src" "$stage/wheels"
rm -rf "$stage/src/build" "$stage/src/"*.egg-info
echo "$mode" > "$stage/mode"
printf '%s\n' "${PGOOM_VM_ONLY:-}" > "$stage/only"
printf '%s\n' "${PGOOM_VM_GUARD_RUNS:-}" > "$stage/guard_runs"
printf '%s\n' "${PGOOM_VM_GUARD_BASELINE_RUNS:-}" > "$stage/guard_baseline_runs"
# Room for the suite's results and the harness's logs; sparse, so 2 GiB costs nothing.
mkfs.ext4 -q -F -L pgoom-work -d "$stage" "$run/work.img" 2G >/dev/null

# --- boot -----------------------------------------------------------------------------------
# TCG is 10-30x slower than KVM; KVM here is PVM, which does not boot stock kernels: try it
# only where it is real (or asked for), and fall back to TCG when the guest does not start.
accels=()
case "${PGOOM_VM_ACCEL:-}" in
  kvm) accels=(kvm) ;;
  tcg) accels=(tcg) ;;
  "") if [ -w /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ]; then accels=(kvm tcg); else accels=(tcg); fi ;;
  *) echo "vm-test: PGOOM_VM_ACCEL is kvm or tcg" >&2; exit 2 ;;
esac
if [ "$mode" = full ]; then
  # The guard's full-mode checks (scripts/vm/guest/guard.py) cost ~3 min per run under TCG:
  # five of N runs (four guarded cases and the benchmark), two baselines of B runs.
  budget_s=$((5400 + (5 * ${PGOOM_VM_GUARD_RUNS:-20} + 2 * ${PGOOM_VM_GUARD_BASELINE_RUNS:-3}) * 180))
else
  budget_s=1800
fi
console="$run/console.log"
boot_s=
accel=
for try in "${accels[@]}"; do
  if [ "$try" = kvm ]; then
    machine=(-accel kvm -cpu host)
  else
    machine=(-accel tcg,thread=multi -cpu max)
  fi
  : > "$console"
  # The cached image stays untouched: each boot writes to a fresh throwaway overlay.
  rm -f "$run/root.qcow2"
  qemu-img create -q -f qcow2 -b "$guest/root.img" -F raw "$run/root.qcow2"
  t0=$(date +%s)
  qemu-system-x86_64 "${machine[@]}" -smp 2 -m 2048 -nographic -no-reboot -nic none \
    -kernel "$guest/vmlinuz" -initrd "$guest/initrd.img" \
    -append "console=ttyS0 root=/dev/vda rw quiet systemd.unified_cgroup_hierarchy=1 panic=-1" \
    -drive "file=$run/root.qcow2,if=virtio,format=qcow2" \
    -drive "file=$run/work.img,if=virtio,format=raw" \
    -serial "file:$console" -monitor none -display none >"$run/qemu.out" 2>&1 &
  qemu_pid=$!
  # The guest says "pgoom-vmtest: started" ~15 s after qemu starts under TCG.
  while kill -0 "$qemu_pid" 2>/dev/null && ! grep -q 'pgoom-vmtest: started' "$console"; do
    if [ $(($(date +%s) - t0)) -gt 180 ]; then break; fi
    sleep 1
  done
  if grep -q 'pgoom-vmtest: started' "$console"; then
    boot_s=$(($(date +%s) - t0))
    accel=$try
    break
  fi
  say "no guest with $try after $(($(date +%s) - t0)) s: $(tail -c 300 "$run/qemu.out" | tr '\n' ' ')"
  kill "$qemu_pid" 2>/dev/null || true
  wait "$qemu_pid" 2>/dev/null || true
  qemu_pid=
done
shown=0
if [ -n "$accel" ]; then
  say "guest up in ${boot_s} s ($accel, $mode mode); suite running"
  timed_out=
  while kill -0 "$qemu_pid" 2>/dev/null; do
    if [ $(($(date +%s) - t0)) -gt "$budget_s" ]; then timed_out=1; break; fi
    # Show the suite's progress as it goes (the console is the guest's journal).
    lines=$(wc -l <"$console")
    if [ "$lines" -gt "$shown" ]; then
      sed -n "$((shown + 1)),${lines}p" "$console" | grep -o 'vm-suite: .*' | cut -c1-200 || true
      shown=$lines
    fi
    sleep 2
  done
  if [ -n "$timed_out" ]; then
    say "the guest ran past its ${budget_s} s budget: stopped"
    kill "$qemu_pid" 2>/dev/null || true
  fi
  wait "$qemu_pid" 2>/dev/null || true
  qemu_pid=
fi
guest_s=$(($(date +%s) - t0))

# --- results --------------------------------------------------------------------------------
mkdir -p "$out"
# Only what a previous run left (never the directory itself: --out may be anything).
rm -rf "$out/summary.json" "$out/summary.md" "$out/console.log" "$out/install.log" "$out/logs"
tr -d '\r' <"$console" | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g' >"$out/console.log"
debugfs -R "rdump /results $run" "$run/work.img" >/dev/null 2>&1 || true
[ -d "$run/results" ] && cp -a "$run/results/." "$out/"
set +e
python3 scripts/vm/report.py "$out" --mode "$mode" --accel "${accel:-none}" \
  --build-s "$build_s" --boot-s "${boot_s:-0}" --guest-s "$guest_s" \
  --total-s "$(($(date +%s) - started))"
