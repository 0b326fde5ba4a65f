#!/usr/bin/env bash
# End-to-end test of the pgoom image with a real Docker on the real kernel, as root:
#   bash scripts/docker-e2e.sh            # everything (install, dockerd, bases, images, checks)
#   bash scripts/docker-e2e.sh base       # only (re)build the stand-in bases
#   REBUILD_BASE=1 NO_CACHE=1 bash scripts/docker-e2e.sh   # from scratch (the CI case)
#   SKIP_ARM64=1 bash scripts/docker-e2e.sh                # amd64 only
# Run it under the shared lock when other tests may use Docker or memcg OOMs:
#   flock /var/lock/pgoom-itest.lock bash scripts/docker-e2e.sh
#
# Docker Hub cannot be reached from the test machines, so the Percona base is replaced by a
# stand-in that looks like it where it matters (docker/standin/): Debian bullseye (its python3
# is 3.9, as UBI 9's), the OS psutil, the real Patroni 4.0.x from PyPI with the raft DCS
# installed on that python3, PostgreSQL (13, bullseye's), a uid-26 postgres user, USER 26,
# PATH with the server's bin directory, the Percona ENTRYPOINT path absent -- and pip,
# ensurepip and apt removed, so the Dockerfile is proven to need nothing from the base but
# python3. The linux/arm64 stand-in is the same without PostgreSQL (nothing there runs it).
# The wheels stage uses the amd64 stand-in as it was before pip was removed.
#
# Checks, each on the built image:
#   1. plain run, relative protection: the seed's `docker run -d --name postgres IMAGE` plus
#      only --memory 300m; many backends from outside the container (psql on its unix socket)
#      until the memcg OOM: the postmaster survives, a backend is the victim.
#   2. the same with PGOOM_RELATIVE_SCORE=off: the postmaster does not survive.
#   3. docker mode: --user 0 --oom-score-adj 1000 -e PGOOM_SCORE=0 -e PGOOM_CHILDREN_SCORE=500
#      --read-only: Patroni runs as uid 26, the postmaster is lowered (1000 -> 0), its
#      children at 500, the monitor runs with CAP_DAC_OVERRIDE (+ CAP_SYS_RESOURCE) only.
#   4. operator mode: uid 26, --read-only, --cap-drop ALL, a floor of 500, command `patroni
#      /etc/patroni`: the shim goes through `pgoom exec`, Patroni starts the postmaster, its
#      children rank above it (1000); `patronictl restart` gives a new postmaster, protected
#      the same way.
#   5. sidecar mode: a second container in the first one's PID namespace, root with
#      --cap-drop ALL --cap-add DAC_OVERRIDE, runs `pgoom watch` and protects the postmaster.
#   6. arm64 under QEMU: `pgoom --version`, `pgoom exec -- id` as root, the patroni shim.
# Prints the time each phase took. dockerd is started if none answers and stopped again.
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-/usr/bin/docker} # docker.io's client matches its daemon (20.10)
# Bump the version when the stand-in's recipe changes: cached bases are then rebuilt.
STANDIN_VERSION=3
BASE_TAG=${BASE_TAG:-pgoom-standin:bullseye-$STANDIN_VERSION}
PIP_TAG=${PIP_TAG:-pgoom-standin:bullseye-pip-$STANDIN_VERSION}
IMAGE_TAG=${IMAGE_TAG:-pgoom:e2e}
PATRONI_VERSION=${PATRONI_VERSION:-4.0.11}
PG_MAJOR=13 # bullseye's PostgreSQL
WORK=${WORK:-/var/tmp/pgoom-docker-e2e}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
RUN_ID=pgoom-e2e-$$
PGDATA=/pgdata/pg$PG_MAJOR
T0=$(date +%s)
PHASE_T=$T0
DOCKERD_PID=""
ARM_PID="" # the arm64 stand-in, built in the background
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
  if [ -n "$ARM_PID" ]; then kill "$ARM_PID" 2>/dev/null || true; fi
  for c in "${CONTAINERS[@]}"; do
    "$DOCKER" rm -f "$c" >/dev/null 2>&1 || true
  done
  "$DOCKER" volume rm "$RUN_ID-pgdata" "$RUN_ID-pgdata-docker" >/dev/null 2>&1 || true
  local m
  for m in "$WORK"/rootfs-*/proc; do
    if mountpoint -q "$m" 2>/dev/null; then umount "$m" || true; fi
  done
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
  command -v psql >/dev/null || need+=(postgresql-client)
  if [ -z "${SKIP_ARM64:-}" ]; then
    [ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
    command -v update-binfmts >/dev/null || need+=(binfmt-support)
  fi
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  if [ -z "${SKIP_ARM64:-}" ]; then
    # qemu-user-static registers with the F flag (the interpreter is opened at registration),
    # so arm64 binaries run inside containers and chroots too.
    mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
    grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 ||
      fail "binfmt_misc qemu-aarch64 lacks the F flag: containers cannot run arm64 binaries"
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

# standin_rootfs ARCH ROOT: bullseye with python3, the OS psutil and Patroni (amd64: and
# PostgreSQL), pip still in it.
standin_rootfs() {
  local arch=$1 root=$2
  rm -rf "$root"
  log "debootstrap bullseye (minbase, $arch) into $root"
  debootstrap --variant=minbase --arch="$arch" bullseye "$root" "$MIRROR" >"$WORK/debootstrap-$arch.log" 2>&1 ||
    { tail -20 "$WORK/debootstrap-$arch.log" >&2; fail "debootstrap $arch"; }
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
  # Patroni's dependencies from the OS where bullseye has them (the Percona base has them
  # from UBI's repositories); pip brings the rest (py-consul, ydiff, pysyncobj).
  local pkgs=(python3 python3-pip python3-psutil python3-yaml python3-click python3-prettytable
    python3-dateutil python3-urllib3 python3-psycopg2 python3-cryptography)
  [ "$arch" = amd64 ] && pkgs+=(postgresql)
  mount -t proc proc "$root/proc"
  chroot "$root" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confold "${pkgs[@]}" >"$WORK/apt-$arch.log" 2>&1 ||
    { tail -20 "$WORK/apt-$arch.log" >&2; fail "apt-get install in the $arch stand-in"; }
  cp "$CA_BUNDLE" "$root/tmp/ca.crt"
  # env -i: the host's PIP_* and SSL variables name paths that do not exist in there.
  chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin PIP_CERT=/tmp/ca.crt python3 -m pip install -q --no-cache-dir \
    --disable-pip-version-check "patroni[raft]==$PATRONI_VERSION" >"$WORK/pip-$arch.log" 2>&1 ||
    { tail -20 "$WORK/pip-$arch.log" >&2; fail "pip install patroni in the $arch stand-in"; }
  rm -f "$root/tmp/ca.crt"
  # The Percona base has /usr/bin/patroni.
  mv "$root"/usr/local/bin/patroni "$root"/usr/local/bin/patronictl "$root/usr/bin/"
  chroot "$root" python3 -c 'import psutil, patroni; assert psutil.__file__.startswith("/usr/lib/python3/")'
  umount "$root/proc"
  install -d -o 26 -g 26 -m 750 "$root/pgdata"
  install -d -m 755 "$root/etc/patroni"
  install -m 644 docker/standin/patroni.yml "$root/etc/patroni/patroni.yml"
  rm -f "$root/usr/sbin/policy-rc.d"
  chroot "$root" apt-get clean
}

# strip_rootfs ROOT: what the Percona base lacks: pip, ensurepip, a package manager.
strip_rootfs() {
  local root=$1
  chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq --auto-remove \
    python3-pip python3-setuptools python3-wheel >/dev/null 2>&1
  rm -rf "$root"/usr/lib/python3.*/ensurepip "$root"/var/lib/apt/lists/* "$root"/var/cache/apt
  chroot "$root" dpkg --purge --force-remove-essential --force-depends apt >/dev/null 2>&1
  rm -f "$root"/usr/bin/dpkg* "$root"/usr/bin/apt*
  ! chroot "$root" python3 -m pip --version >/dev/null 2>&1 || fail "pip still in the stand-in"
  ! chroot "$root" python3 -m ensurepip --version >/dev/null 2>&1 || fail "ensurepip still in the stand-in"
}

# import_rootfs ROOT TAG ARCH: the image, with the Percona base's metadata. Written as a
# `docker save` archive and loaded: `docker import --platform` is ignored by a dockerd
# without experimental features, and an arm64 base recorded as amd64 is not found by an
# arm64 build (BuildKit then asks Docker Hub).
import_rootfs() {
  local root=$1 tag=$2 arch=$3 dir=$WORK/image-$3
  rm -rf "$dir"
  mkdir -p "$dir"
  tar -C "$root" --numeric-owner -c . >"$dir/layer.tar"
  # A plain `docker run` has no /etc/patroni argument: Patroni then reads
  # PATRONI_CONFIGURATION (JSON is YAML).
  .venv/bin/python - "$dir" "$tag" "$arch" "$PG_MAJOR" docker/standin/patroni.yml <<'PY'
import hashlib, json, os, sys
import yaml

out, tag, arch, pg_major, patroni_yml = sys.argv[1:]
digest = hashlib.sha256()
with open(os.path.join(out, "layer.tar"), "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
patroni = json.dumps(yaml.safe_load(open(patroni_yml)), separators=(",", ":"))
config = {
    "architecture": arch,
    "os": "linux",
    "config": {
        "Env": [
            f"PATH=/usr/lib/postgresql/{pg_major}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            f"PATRONI_CONFIGURATION={patroni}",
        ],
        "User": "26",
        "Entrypoint": ["/opt/crunchy/bin/postgres-ha/bootstrap-postgres-ha.sh"],
        "Cmd": ["/usr/bin/patroni"],
    },
    "rootfs": {"type": "layers", "diff_ids": [f"sha256:{digest.hexdigest()}"]},
    "history": [{"created_by": "scripts/docker-e2e.sh: Percona stand-in"}],
}
raw = json.dumps(config).encode()
name = hashlib.sha256(raw).hexdigest() + ".json"
with open(os.path.join(out, name), "wb") as f:
    f.write(raw)
with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump([{"Config": name, "RepoTags": [tag], "Layers": ["layer.tar"]}], f)
PY
  tar -C "$dir" -c . | "$DOCKER" load >/dev/null
  rm -rf "$dir"
}

build_standin() { # ARCH TAG
  local arch=$1 tag=$2
  if "$DOCKER" image inspect "$tag" >/dev/null 2>&1 && [ -z "${REBUILD_BASE:-}" ] &&
    { [ "$arch" != amd64 ] || "$DOCKER" image inspect "$PIP_TAG" >/dev/null 2>&1; }; then
    log "stand-in base $tag exists (REBUILD_BASE=1 to rebuild)"
    return
  fi
  local root=$WORK/rootfs-$arch
  standin_rootfs "$arch" "$root"
  # The wheels stage's image: the same python3 (3.9), pip kept. Only the build machine's
  # architecture is needed: pip never runs emulated.
  [ "$arch" = amd64 ] && import_rootfs "$root" "$PIP_TAG" "$arch"
  strip_rootfs "$root"
  import_rootfs "$root" "$tag" "$arch"
  rm -rf "$root"
  phase_done "stand-in base ($arch)"
}

build_image() { # PLATFORM TAG
  local platform=$1 tag=$2 base=$BASE_TAG
  [ "$platform" = linux/arm64 ] && base=$BASE_TAG-arm64
  # BuildKit for the secret mount: pip in the wheels stage must trust the host's CA bundle.
  DOCKER_BUILDKIT=1 "$DOCKER" build --network host ${NO_CACHE:+--no-cache} \
    --platform "$platform" --secret "id=ca,src=$CA_BUNDLE" \
    --build-arg "BASE_IMAGE=$base" --build-arg "PIP_IMAGE=$PIP_TAG" \
    --build-arg "PG_MAJOR=$PG_MAJOR" \
    -t "$tag" . >"$WORK/build-${platform#linux/}.log" 2>&1 ||
    { tail -40 "$WORK/build-${platform#linux/}.log" >&2; fail "docker build $platform"; }
  phase_done "image build ($platform)"
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
  "$DOCKER" exec --user 26 "$1" head -1 "$PGDATA/postmaster.pid" 2>/dev/null
}

# As root in the container: /proc/<pid>/environ of the uid-26 postmaster needs it.
in_ctr() { "$DOCKER" exec --user 0 "$1" sh -c "$2"; }

db_ready() { in_ctr "$1" "pg_isready -q -h /tmp -U postgres"; }

# first_child CONTAINER PID: a postgres child of the postmaster (not pgoom's supervisor).
# (The postmaster's first child may be pgoom's supervisor, reparented: watcher/exec/supervisor.py.)
first_child() {
  in_ctr "$1" "for p in \$(cat /proc/$2/task/$2/children); do
      [ \"\$(cat /proc/\$p/comm)\" = postgres ] && echo \$p; done; true" | awk 'NR == 1'
}

# wait_child_score CONTAINER PID SCORE: a child of the postmaster reaches SCORE (a
# just-forked child shows the postmaster's score until it writes PG_OOM_ADJUST_VALUE).
wait_child_score() {
  local c=$1 pm=$2 want=$3 child score=""
  for _ in $(seq 1 100); do
    child=$(first_child "$c" "$pm")
    [ -n "$child" ] && score=$(in_ctr "$c" "cat /proc/$child/oom_score_adj" 2>/dev/null || true)
    [ "$score" = "$want" ] && { echo "$child"; return 0; }
    sleep 0.2
  done
  return 1
}

# host_pid CONTAINER NSPID: the host's PID of a process of the container.
host_pid() {
  local top p
  top=$("$DOCKER" inspect -f '{{.State.Pid}}' "$1")
  for p in $(cat "$(memcg_dir "$1")/cgroup.procs"); do
    if [ "$(awk '/^NSpid:/ {print $NF}' "/proc/$p/status" 2>/dev/null)" = "$2" ]; then
      echo "$p"
      return
    fi
  done
  [ "$2" = 1 ] && echo "$top"
}

memcg_dir() { # the container's memory cgroup (v1, cgroupfs driver)
  local id
  id=$("$DOCKER" inspect -f '{{.Id}}' "$1")
  echo "/sys/fs/cgroup/memory/docker/$id"
}


# plain_oom MODE: MODE on = the seed's command + --memory 300m; off = the same with
# relative protection switched off. Prints the outcome; fails when it is not the expected one.
plain_oom() {
  local mode=$1 c=postgres
  "$DOCKER" container inspect "$c" >/dev/null 2>&1 &&
    fail "a container named postgres exists already: remove it (docker rm -f postgres)"
  CONTAINERS+=("$c")
  local extra=()
  [ "$mode" = off ] && extra=(-e PGOOM_RELATIVE_SCORE=off)
  "$DOCKER" run -d --name postgres --memory 300m "${extra[@]}" "$IMAGE_TAG" >/dev/null
  wait_for 120 db_ready "$c" || { "$DOCKER" logs "$c" >&2; fail "plain run ($mode): the database did not start"; }
  local pm pm_host score child child_score cg logs
  pm=$(postmaster_pid "$c")
  score=$(in_ctr "$c" "cat /proc/$pm/oom_score_adj")
  local want_child=1000
  [ "$mode" = off ] && want_child=0
  child=$(wait_child_score "$c" "$pm" "$want_child") ||
    fail "plain run ($mode): no child of the postmaster at $want_child"
  logs=$("$DOCKER" logs "$c" 2>&1)
  if [ "$mode" = on ]; then
    grep -q "pgoom: relative protection: the postmaster stays at oom_score_adj 0 (not root)" <<<"$logs" ||
      { echo "$logs" >&2; fail "plain run: no relative-protection line"; }
  else
    grep -q "relative protection is off" <<<"$logs" || { echo "$logs" >&2; fail "plain run (off): no warning"; }
  fi
  cg=$(memcg_dir "$c")
  pm_host=$(host_pid "$c" "$pm")
  [ -n "$pm_host" ] || fail "plain run ($mode): postmaster $pm not found on the host"
  log "plain run ($mode): PID 1 $(in_ctr "$c" 'cat /proc/1/comm') uid $(in_ctr "$c" "awk '/^Uid:/ {print \$2}' /proc/1/status"), postmaster $pm (host $pm_host) at $score, child $child at $want_child"
  [ "$score" = 0 ] || fail "plain run ($mode): postmaster at $score, want Docker's 0 (never raised)"
  local start_ticks outcome
  start_ticks=$(awk '{print $22}' "/proc/$pm_host/stat")
  # The load, from outside: psql on the container's socket through /proc/<pid>/root.
  outcome=$(.venv/bin/python - "$pm_host" "$cg" <<'EOF'
import os, subprocess, sys, time

pm, cg = int(sys.argv[1]), sys.argv[2]
sock = f"/proc/{pm}/root/tmp"

def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0

last_kills = [0]

def kills():
    # The memcg goes with the container when the kernel kills its PID 1: keep the last count.
    try:
        with open(f"{cg}/memory.oom_control") as f:
            last_kills[0] = int(dict(line.split() for line in f)["oom_kill"])
    except OSError:
        pass
    return last_kills[0]

def session():
    p = subprocess.Popen(
        ["psql", "-h", sock, "-U", "postgres", "-d", "postgres", "-XqAt", "-v", "ON_ERROR_STOP=0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    return p

def run(p, sql, timeout_s=60):
    p.stdin.write(sql + "\n\\echo e2e-done\n")
    p.stdin.flush()
    lines = []
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        line = p.stdout.readline()
        if not line:
            return None  # the connection (or psql) is gone
        if line.strip() == "e2e-done":
            return lines
        lines.append(line.strip())
    return None

def host_of(nspid):
    for p in open(f"{cg}/cgroup.procs").read().split():
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("NSpid:") and line.split()[-1] == str(nspid):
                        return int(p)
        except OSError:
            pass
    return None

before = kills()
sessions = [session()]
out = run(sessions[0], "select pg_backend_pid();")
backend = host_of(int(out[-1]))
# Each backend grows to ~4 MiB below the postmaster, in 128 KiB steps, so no backend outgrows
# it: when the last one pushes the group over its limit, the postmaster is the largest
# process of the database (the harness's many-backends load, scripts/oomharness).
hold_mb = max(1, min(20, int(rss_mb(pm) - rss_mb(backend) - 4)))
pm_mb = rss_mb(pm)
count = 0
for _ in range(80):
    if count:
        sessions.append(session())
    sql = ("select count(set_config('e2e.hold' || i, repeat('x', 131072), false)) "
           f"from generate_series(1, {hold_mb * 8}) i;")
    done = run(sessions[-1], sql)
    count += 1
    if done is None or kills() > before:
        break
deadline = time.monotonic() + 30
while kills() == before and time.monotonic() < deadline:
    time.sleep(0.2)
print(f"sessions={count} hold_mb={hold_mb} postmaster_rss_mb={pm_mb:.1f} oom_kills={kills() - before}")
for p in sessions:
    p.kill()
EOF
)
  log "plain run ($mode): load: $outcome"
  # The load counted the kills while the container lived: without protection the kernel can
  # take Patroni (PID 1), the container ends and its memcg is gone before it can be re-read.
  local kills_seen=${outcome##*oom_kills=}
  kills_seen=${kills_seen%% *}
  [ "${kills_seen:-0}" -gt 0 ] 2>/dev/null || fail "plain run ($mode): no OOM kill in the container's memcg"
  local victims alive=no id
  # The kernel's summary line names the memcg: only this container's kills count.
  id=$("$DOCKER" inspect -f '{{.Id}}' "$c")
  victims=$(dmesg | sed -n "s/.*oom-kill:.*oom_memcg=\/docker\/$id,.*task=\([^,]*\),pid=\([0-9]*\),.*/\2 \1/p" |
    tr '\n' ' ' || true)
  if [ -e "/proc/$pm_host/stat" ] && [ "$(awk '{print $22}' "/proc/$pm_host/stat")" = "$start_ticks" ]; then
    alive=yes
  fi
  log "plain run ($mode): killed (host pid, comm): ${victims:-?}; postmaster $pm_host survived: $alive"
  if [ "$mode" = on ]; then
    [ "$alive" = yes ] || fail "plain run: the postmaster died with relative protection on"
    grep -qw "$pm_host" <<<"$victims" && fail "plain run: the postmaster was the victim"
    grep -q "[0-9] postgres" <<<"$victims" || fail "plain run: the victim was not a PostgreSQL process: $victims"
    wait_for 60 db_ready "$c" || fail "plain run: the database did not come back after the OOM"
  else
    [ "$alive" = no ] || fail "plain run (off): the postmaster survived: the control proves nothing"
  fi
  "$DOCKER" rm -f "$c" >/dev/null
  phase_done "plain run, relative protection $mode"
}

test_docker_mode() {
  local c=$RUN_ID-docker
  CONTAINERS+=("$c")
  # Read-only root as well: only /tmp (the monitor's lock and log) and the data volume are
  # written.
  "$DOCKER" run -d --name "$c" --user 0 --oom-score-adj 1000 -e PGOOM_SCORE=0 \
    -e PGOOM_CHILDREN_SCORE=500 --read-only --tmpfs /tmp -v "$RUN_ID-pgdata-docker:/pgdata" \
    "$IMAGE_TAG" >/dev/null
  wait_for 120 db_ready "$c" || { "$DOCKER" logs "$c" >&2; fail "docker mode: the database did not start"; }
  local pm score main_uid main_cmd
  pm=$(postmaster_pid "$c")
  score=$(in_ctr "$c" "cat /proc/$pm/oom_score_adj")
  main_uid=$(in_ctr "$c" "awk '/^Uid:/ {print \$2}' /proc/1/status")
  main_cmd=$(in_ctr "$c" "tr '\\0' ' ' </proc/1/cmdline")
  log "docker mode: postmaster pid $pm score $score; PID 1 uid $main_uid: $main_cmd"
  [ "$score" = 0 ] || fail "docker mode: postmaster at $score, want 0"
  [ "$main_uid" = 26 ] || fail "docker mode: CMD runs as uid $main_uid, want 26"
  grep -q "/usr/bin/patroni" <<<"$main_cmd" || fail "docker mode: PID 1 is not Patroni: $main_cmd"
  local child
  child=$(wait_child_score "$c" "$pm" 500) || fail "docker mode: no child at 500 (PG_OOM_ADJUST_VALUE)"
  log "docker mode: postmaster child $child at 500"
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
  [ -n "$mon" ] || { "$DOCKER" logs "$c" >&2; fail "docker mode: no monitor process"; }
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
  # command `patroni /etc/patroni` (PATH lookup finds the shim); a Burstable pod's floor.
  "$DOCKER" run -d --name "$c" --user 26 --read-only --cap-drop ALL \
    --security-opt no-new-privileges --oom-score-adj 500 \
    --tmpfs /tmp -v "$RUN_ID-pgdata:/pgdata" \
    --entrypoint patroni "$IMAGE_TAG" /etc/patroni >/dev/null
  wait_for 120 db_ready "$c" || { "$DOCKER" logs "$c" >&2; fail "operator mode: the database did not start"; }
  local logs main_cmd pm score child
  logs=$("$DOCKER" logs "$c" 2>&1)
  main_cmd=$(in_ctr "$c" "tr '\\0' ' ' </proc/1/cmdline")
  grep -q "/usr/bin/patroni /etc/patroni" <<<"$main_cmd" ||
    fail "operator mode: PID 1 is not the real Patroni with its argument: $main_cmd"
  grep -q "pgoom: relative protection: the postmaster stays at oom_score_adj 500 (not root)" <<<"$logs" ||
    { echo "$logs" >&2; fail "operator mode: the shim did not go through pgoom exec"; }
  pm=$(postmaster_pid "$c")
  score=$(in_ctr "$c" "cat /proc/$pm/oom_score_adj")
  [ "$score" = 500 ] || fail "operator mode: postmaster at $score, want the floor 500"
  child=$(wait_child_score "$c" "$pm" 1000) || fail "operator mode: no child of the postmaster at 1000"
  log "operator mode: PID 1: $main_cmd; postmaster $pm at 500, child $child at 1000"
  # patronictl restart: Patroni stops the postmaster and starts a new one.
  "$DOCKER" exec --user 26 "$c" patronictl -c /etc/patroni/patroni.yml restart pgoom-e2e pg0 --force \
    >"$WORK/patronictl.log" 2>&1 || { cat "$WORK/patronictl.log" >&2; fail "operator mode: patronictl restart"; }
  local new=""
  for _ in $(seq 1 300); do
    new=$(postmaster_pid "$c" || true)
    [ -n "$new" ] && [ "$new" != "$pm" ] && db_ready "$c" && break
    sleep 0.2
  done
  [ -n "$new" ] && [ "$new" != "$pm" ] || fail "operator mode: no new postmaster after patronictl restart"
  score=$(in_ctr "$c" "cat /proc/$new/oom_score_adj")
  child=$(wait_child_score "$c" "$new" 1000) || fail "operator mode: new postmaster's children not at 1000"
  [ "$score" = 500 ] || fail "operator mode: new postmaster at $score"
  log "operator mode: patronictl restart: postmaster $pm -> $new at $score, child $child at 1000"
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
  # only CAP_DAC_OVERRIDE (CAP_SYS_RESOURCE too where the host has it; not here: Docker
  # could not set a floor either, so 0 is allowed).
  "$DOCKER" run -d --name "$side" --pid "container:$db" --user 0 --cap-drop ALL \
    --cap-add DAC_OVERRIDE --read-only --tmpfs /tmp -v "$RUN_ID-pgdata:/pgdata:ro" \
    --entrypoint /opt/pgoom/bin/pgoom "$IMAGE_TAG" \
    watch --score 0 --data-dir "$PGDATA" --log-file "" >/dev/null
  wait_for 30 sh -c "[ \"\$($DOCKER exec $db cat /proc/$pm/oom_score_adj)\" = 0 ]" ||
    { "$DOCKER" logs "$side" >&2; fail "sidecar mode: postmaster still at $(in_ctr "$db" "cat /proc/$pm/oom_score_adj")"; }
  local side_logs
  side_logs=$("$DOCKER" logs "$side" 2>&1)
  grep -q "protected postmaster pid=$pm " <<<"$side_logs" ||
    { echo "$side_logs" >&2; fail "sidecar mode: the sidecar did not log the protection"; }
  log "sidecar mode: postmaster $before -> 0; $(grep -m1 'source:' <<<"$side_logs" || true)"
  phase_done "sidecar mode"
}

test_arm64() {
  local tag=$IMAGE_TAG-arm64 out
  run_arm() { "$DOCKER" run --rm --platform linux/arm64 "$@"; }
  out=$(run_arm --entrypoint uname "$tag" -m)
  [ "$out" = aarch64 ] || fail "arm64: uname -m says $out"
  out=$(run_arm --entrypoint /opt/pgoom/bin/pgoom "$tag" --version)
  log "arm64: pgoom --version: $out"
  # The image's ENTRYPOINT as root: pgoom exec switches to uid 26 before exec'ing CMD.
  out=$(run_arm --user 0 -e PGOOM_NO_WATCH=1 "$tag" id 2>"$WORK/arm64-exec.err") ||
    { cat "$WORK/arm64-exec.err" >&2; fail "arm64: pgoom exec -- id"; }
  grep -q "^uid=26(postgres) gid=26(postgres)" <<<"$out" || fail "arm64: pgoom exec -- id gave: $out"
  log "arm64: pgoom exec -- id as root: $out"
  # The operator's command: the patroni shim -> pgoom exec -> the real Patroni.
  out=$(run_arm --user 26 --cap-drop ALL --entrypoint patroni "$tag" --version 2>&1) ||
    { echo "$out" >&2; fail "arm64: the patroni shim"; }
  grep -q "relative protection" <<<"$out" || { echo "$out" >&2; fail "arm64: the shim bypassed pgoom exec"; }
  grep -q "^patroni $PATRONI_VERSION" <<<"$out" || { echo "$out" >&2; fail "arm64: no Patroni version"; }
  log "arm64: patroni shim: $(grep '^patroni' <<<"$out")"
  phase_done "arm64 smoke"
}

test_base_constraints() {
  # What the final image must not have: pip, ensurepip, a compiler or a package manager;
  # Patroni's python3 still imports the OS psutil, not pgoom's.
  local out
  out=$("$DOCKER" run --rm --entrypoint sh "$IMAGE_TAG" -c '
    python3 -m pip --version >/dev/null 2>&1 && echo "pip"
    python3 -m ensurepip --version >/dev/null 2>&1 && echo "ensurepip"
    for t in pip pip3 gcc cc apt-get dpkg microdnf dnf; do command -v "$t"; done
    python3 -c "import psutil; print(psutil.__file__)"' 2>&1)
  log "final image: $(tr '\n' ' ' <<<"$out")"
  [ "$(wc -l <<<"$out")" = 1 ] && grep -q '^/usr/lib/python3/dist-packages/psutil' <<<"$out" ||
    fail "final image: $out"
}

main() {
  install_tools
  start_dockerd
  build_standin amd64 "$BASE_TAG"
  # The arm64 stand-in (~7 min cold, emulated dpkg and pip) builds beside the amd64 checks.
  if [ -z "${SKIP_ARM64:-}" ]; then
    build_standin arm64 "$BASE_TAG-arm64" 2>"$WORK/standin-arm64.log" &
    ARM_PID=$!
  fi
  wait_arm64() {
    [ -n "$ARM_PID" ] || return 0
    wait "$ARM_PID" || { cat "$WORK/standin-arm64.log" >&2; fail "arm64 stand-in base"; }
    cat "$WORK/standin-arm64.log" >&2
    ARM_PID=""
  }
  if [ "${1:-}" = base ]; then
    wait_arm64
    return
  fi
  build_image linux/amd64 "$IMAGE_TAG"
  test_base_constraints
  plain_oom on
  plain_oom off
  test_docker_mode
  test_operator_mode
  test_sidecar_mode
  if [ -z "${SKIP_ARM64:-}" ]; then
    wait_arm64
    PHASE_T=$(date +%s)
    build_image linux/arm64 "$IMAGE_TAG-arm64"
    test_arm64
  fi
  log "PASS in $(($(date +%s) - T0)) s"
}

main "$@"
