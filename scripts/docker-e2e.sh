#!/usr/bin/env bash
# End-to-end test of the pgoom image with a real Docker on the real kernel, as root:
#   bash scripts/docker-e2e.sh            # everything (install, dockerd, base, image, checks)
#   bash scripts/docker-e2e.sh base       # only (re)build the stand-in base
#   REBUILD_BASE=1 NO_CACHE=1 bash scripts/docker-e2e.sh   # from scratch (the CI case)
#
# Docker Hub cannot be reached from the test machines, so the Percona base is replaced by a
# stand-in that has what the Dockerfile relies on: Debian bookworm (debootstrap minbase),
# PostgreSQL, python3, a user with uid 26, USER 26, the Percona ENTRYPOINT path (absent, as it
# likely is in the real image) and CMD /usr/bin/patroni -- a fake Patroni that execs the
# postmaster with Patroni's command line (docker/standin/patroni).
#
# Checks, each on the built image:
#   1. docker mode: `docker run --user 0 --oom-score-adj 1000 -e PGOOM_SCORE=0
#      -e PGOOM_CHILDREN_SCORE=500 --read-only` -> the original CMD runs as uid 26, the
#      postmaster is protected (1000 -> 0), its children at 500 (PG_OOM_ADJUST_VALUE reached
#      it), the monitor runs with only CAP_DAC_OVERRIDE (+ CAP_SYS_RESOURCE where the host
#      has it).
#   2. operator mode: uid 26, --read-only, --cap-drop ALL, command `patroni /etc/patroni` ->
#      the shim goes through `pgoom exec`, the database starts, pgoom says it is not root.
#   3. sidecar mode: a second container in the first one's PID namespace, root with
#      --cap-drop ALL --cap-add DAC_OVERRIDE, runs `pgoom watch` and protects the postmaster.
# Prints the time each phase took. dockerd is started if none answers and stopped again.
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-/usr/bin/docker} # docker.io's client matches its daemon (20.10)
BASE_TAG=${BASE_TAG:-pgoom-standin:bookworm}
IMAGE_TAG=${IMAGE_TAG:-pgoom:e2e}
WORK=${WORK:-/var/tmp/pgoom-docker-e2e}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
RUN_ID=pgoom-e2e-$$
T0=$(date +%s)
PHASE_T=$T0
DOCKERD_PID=""
CONTAINERS=()

log() { echo "docker-e2e: $*" >&2; }
fail() {
  log "FAIL: $*"
  exit 1
}
phase_done() {
  local now
  now=$(date +%s)
  log "$1 took $((now - PHASE_T)) s"
  PHASE_T=$now
}

cleanup() {
  local c
  for c in "${CONTAINERS[@]}"; do
    "$DOCKER" rm -f "$c" >/dev/null 2>&1 || true
  done
  "$DOCKER" volume rm "$RUN_ID-pgdata" "$RUN_ID-pgdata-docker" >/dev/null 2>&1 || true
  if mountpoint -q "$WORK/rootfs/proc" 2>/dev/null; then umount "$WORK/rootfs/proc" || true; fi
  if [ -n "$DOCKERD_PID" ]; then
    kill "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.1; done
  fi
}
trap cleanup EXIT

install_tools() {
  [ "$(id -u)" -eq 0 ] || fail "run as root (dockerd, debootstrap)"
  local need=()
  [ -x /usr/bin/docker ] && command -v dockerd >/dev/null || need+=(docker.io)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  phase_done "install"
}

start_dockerd() {
  mkdir -p "$WORK"
  if "$DOCKER" info >/dev/null 2>&1; then
    log "using the running dockerd"
    return
  fi
  dockerd >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 1 300); do
    "$DOCKER" info >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || { cat "$WORK/dockerd.log" >&2; fail "dockerd exited"; }
    sleep 0.2
  done
  "$DOCKER" info >/dev/null 2>&1 || fail "dockerd did not answer within 60 s"
  phase_done "dockerd start"
}

build_standin_base() {
  if "$DOCKER" image inspect "$BASE_TAG" >/dev/null 2>&1 && [ -z "${REBUILD_BASE:-}" ]; then
    log "stand-in base $BASE_TAG exists (REBUILD_BASE=1 to rebuild)"
    return
  fi
  local root=$WORK/rootfs
  rm -rf "$root"
  log "debootstrap bookworm (minbase) into $root"
  debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap"; }
  # The Percona image's database user is uid 26; create it before the postgresql package
  # would pick another uid, and keep the package from creating and starting a cluster.
  # Debian gives gid 26 to "tape": rename it, as the Percona image has postgres 26:26.
  chroot "$root" groupmod -n postgres "$(chroot "$root" getent group 26 | cut -d: -f1)" ||
    chroot "$root" groupadd -g 26 postgres
  chroot "$root" useradd -u 26 -g 26 -d /var/lib/postgresql -s /bin/sh postgres
  mkdir -p "$root/etc/postgresql-common"
  echo "create_main_cluster = false" >"$root/etc/postgresql-common/createcluster.conf"
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 755 "$root/usr/sbin/policy-rc.d"
  mount -t proc proc "$root/proc"
  chroot "$root" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confold postgresql python3 >"$WORK/apt.log" 2>&1 ||
    { tail -20 "$WORK/apt.log" >&2; fail "apt-get install in the stand-in"; }
  umount "$root/proc"
  chroot "$root" apt-get clean
  rm -rf "$root"/var/lib/apt/lists/* "$root/usr/sbin/policy-rc.d"
  install -m 755 docker/standin/patroni "$root/usr/bin/patroni"
  install -d -o 26 -g 26 -m 750 "$root/pgdata"
  local bindir
  bindir=$(dirname "$(ls "$root"/usr/lib/postgresql/*/bin/postgres | head -1)")
  bindir=${bindir#"$root"}
  tar -C "$root" -c . | "$DOCKER" import \
    --change "ENV PATH=$bindir:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change 'USER 26' \
    --change 'ENTRYPOINT ["/opt/crunchy/bin/postgres-ha/bootstrap-postgres-ha.sh"]' \
    --change 'CMD ["/usr/bin/patroni"]' \
    - "$BASE_TAG" >/dev/null
  rm -rf "$root"
  phase_done "stand-in base"
}

build_image() {
  # BuildKit for the secret mount: pip in the build stage must trust the host's CA bundle.
  DOCKER_BUILDKIT=1 "$DOCKER" build --network host ${NO_CACHE:+--no-cache} \
    --secret "id=ca,src=$CA_BUNDLE" \
    --build-arg "BASE_IMAGE=$BASE_TAG" --build-arg PG_MAJOR=16 \
    -t "$IMAGE_TAG" . >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; fail "docker build"; }
  phase_done "image build"
}

# wait_for SECONDS COMMAND...: poll (0.2 s) until COMMAND succeeds.
wait_for() {
  local limit=$1
  shift
  local end=$(($(date +%s) + limit))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || return 1
    sleep 0.2
  done
}

postmaster_pid() { # container: print the postmaster's PID in the container's namespace
  # As uid 26: the data directory is 0700, and root has no CAP_DAC_OVERRIDE under --cap-drop ALL.
  "$DOCKER" exec --user 26 "$1" head -1 /pgdata/pg16/postmaster.pid 2>/dev/null
}

# As root in the container: /proc/<pid>/environ of the uid-26 postmaster needs it.
in_ctr() { "$DOCKER" exec --user 0 "$1" sh -c "$2"; }

test_docker_mode() {
  local c=$RUN_ID-docker
  CONTAINERS+=("$c")
  # Read-only root as well: only /tmp (the monitor's lock and log) and the data volume are
  # written.
  "$DOCKER" run -d --name "$c" --user 0 --oom-score-adj 1000 -e PGOOM_SCORE=0 \
    -e PGOOM_CHILDREN_SCORE=500 --read-only --tmpfs /tmp -v "$RUN_ID-pgdata-docker:/pgdata" \
    "$IMAGE_TAG" >/dev/null
  wait_for 60 in_ctr "$c" 'pg_isready -q -h /tmp -U postgres' ||
    { "$DOCKER" logs "$c" >&2; fail "docker mode: the database did not start"; }
  local pm score main_uid logs
  pm=$(postmaster_pid "$c")
  score=$(in_ctr "$c" "cat /proc/$pm/oom_score_adj")
  main_uid=$(in_ctr "$c" "awk '/^Uid:/ {print \$2}' /proc/1/status")
  logs=$("$DOCKER" logs "$c" 2>&1)
  log "docker mode: postmaster pid $pm (PID 1 is $(in_ctr "$c" 'cat /proc/1/comm')) score $score, uid $main_uid"
  [ "$score" = 0 ] || fail "docker mode: postmaster at $score, want 0"
  [ "$main_uid" = 26 ] || fail "docker mode: CMD runs as uid $main_uid, want 26"
  grep -q "stand-in patroni: uid=26" <<<"$logs" || { echo "$logs" >&2; fail "docker mode: CMD did not run"; }
  # PG_OOM_ADJUST_VALUE reached the postmaster: its children (checkpointer, ...) set 500.
  local child child_score
  # (The postmaster's first child is pgoom's supervisor: reparented to PID 1, see
  # watcher/exec/supervisor.py. Take a postgres one.)
  child=$(in_ctr "$c" "for p in \$(cat /proc/$pm/task/$pm/children); do
      [ \"\$(cat /proc/\$p/comm)\" = postgres ] && echo \$p; done; true" | awk "NR == 1")
  child_score=$(in_ctr "$c" "cat /proc/$child/oom_score_adj")
  log "docker mode: postmaster child $child at $child_score"
  [ "$child_score" = 500 ] || fail "docker mode: child at $child_score, want 500 (PG_OOM_ADJUST_VALUE)"
  local mon capeff
  # The supervisor names itself pgoom-supervise; the monitor is its only child.
  monitor_pid() {
    in_ctr "$c" 'for p in /proc/[0-9]*; do
        [ "$(cat $p/comm 2>/dev/null)" = pgoom-supervise ] && cat $p/task/*/children
      done; true' 2>/dev/null | awk 'NF {print $1; exit}'
  }
  for _ in $(seq 1 100); do
    mon=$(monitor_pid)
    [ -n "$mon" ] && break
    sleep 0.2
  done
  [ -n "$mon" ] || { echo "$logs" >&2; fail "docker mode: no monitor process"; }
  capeff=$(in_ctr "$c" "awk '/^CapEff:/ {print \$2}' /proc/$mon/status")
  log "docker mode: monitor pid $mon CapEff $capeff"
  case $capeff in
    0000000000000002 | 0000000001000002) ;;
    *) fail "docker mode: monitor CapEff $capeff, want DAC_OVERRIDE (+SYS_RESOURCE) only" ;;
  esac
  "$DOCKER" stop -t 20 "$c" >/dev/null
  phase_done "docker mode"
}

test_operator_mode() {
  local c=$RUN_ID-operator
  CONTAINERS+=("$c")
  # What the Percona operator does: uid 26, no capabilities, read-only root, /tmp writable,
  # command `patroni /etc/patroni` (PATH lookup finds the shim).
  "$DOCKER" run -d --name "$c" --user 26 --read-only --cap-drop ALL \
    --security-opt no-new-privileges --oom-score-adj 1000 \
    --tmpfs /tmp -v "$RUN_ID-pgdata:/pgdata" \
    --entrypoint patroni "$IMAGE_TAG" /etc/patroni >/dev/null
  wait_for 60 in_ctr "$c" 'pg_isready -q -h /tmp -U postgres' ||
    { "$DOCKER" logs "$c" >&2; fail "operator mode: the database did not start"; }
  local logs
  logs=$("$DOCKER" logs "$c" 2>&1)
  grep -q "stand-in patroni: uid=26 .* args=/etc/patroni" <<<"$logs" ||
    { echo "$logs" >&2; fail "operator mode: the real patroni did not get its arguments"; }
  grep -q "pgoom: not running as root" <<<"$logs" ||
    { echo "$logs" >&2; fail "operator mode: the shim did not go through pgoom exec"; }
  log "operator mode: patroni shim -> pgoom exec -> patroni ran as uid 26 on a read-only root"
  phase_done "operator mode"
}

test_sidecar_mode() {
  local db=$RUN_ID-operator side=$RUN_ID-sidecar
  CONTAINERS+=("$side")
  local pm before
  pm=$(postmaster_pid "$db")
  # Back to the pod's 1000 first, in case a pgoom on the host (another test) got there: the
  # owner may always raise. The sidecar's log must then say that *it* protected it.
  "$DOCKER" exec --user 26 "$db" sh -c "echo 1000 >/proc/$pm/oom_score_adj"
  before=$(in_ctr "$db" "cat /proc/$pm/oom_score_adj")
  # As in a pod: the sidecar shares the database container's PID namespace
  # (shareProcessNamespace) and mounts the data volume read-only at the same path; root with
  # only CAP_DAC_OVERRIDE (CAP_SYS_RESOURCE too where the host has it; not here).
  "$DOCKER" run -d --name "$side" --pid "container:$db" --user 0 --cap-drop ALL \
    --cap-add DAC_OVERRIDE --read-only --tmpfs /tmp -v "$RUN_ID-pgdata:/pgdata:ro" \
    --entrypoint /opt/pgoom/bin/pgoom "$IMAGE_TAG" \
    watch --score 0 --data-dir /pgdata/pg16 --log-file "" >/dev/null
  wait_for 30 sh -c "[ \"\$($DOCKER exec $db cat /proc/$pm/oom_score_adj)\" = 0 ]" ||
    { "$DOCKER" logs "$side" >&2; fail "sidecar mode: postmaster still at $(in_ctr "$db" "cat /proc/$pm/oom_score_adj")"; }
  local side_logs
  side_logs=$("$DOCKER" logs "$side" 2>&1)
  grep -q "protected postmaster pid=$pm " <<<"$side_logs" ||
    { echo "$side_logs" >&2; fail "sidecar mode: the sidecar did not log the protection"; }
  log "sidecar mode: postmaster $before -> 0; $(grep -m1 'source:' <<<"$side_logs" || true)"
  phase_done "sidecar mode"
}

main() {
  install_tools
  start_dockerd
  build_standin_base
  [ "${1:-}" = base ] && return
  build_image
  test_docker_mode
  test_operator_mode
  test_sidecar_mode
  log "PASS in $(($(date +%s) - T0)) s"
}

main "$@"
