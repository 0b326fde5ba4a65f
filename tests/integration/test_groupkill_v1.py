"""The group-kill policy on this host's real kernel: cgroup v1 (no group kill), floor 0 and no
CAP_SYS_RESOURCE (so -1000 is refused for real). The v2 group kill itself is proven in the VM
(scripts/vm/guest, checks named "group kill: ...")."""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.support.pg import Cluster, read_score, wait_for
from tests.support.watcher import PGOOM, Watcher
from watcher import memcg

V1_ROOT = "/sys/fs/cgroup/memory"
LIMIT_BYTES = 512 * 1024 * 1024

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.isdir(V1_ROOT), reason="needs root and a v1 memory cgroup"
)


def pgoom(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PGOOM, *args], check=False, capture_output=True, text=True, timeout=60)


def own_rules(cluster: Cluster) -> list[str]:
    return ["--pattern", re.escape(f"postgres -D {cluster.data_dir}") + "(?: |$)"]


@pytest.fixture
def v1_cgroup() -> Iterator[str]:
    own = memcg.memory_cgroup_line(memcg.parse_proc_cgroup(open("/proc/self/cgroup").read()))
    assert own is not None and own[0] == 1
    directory = f"{V1_ROOT}{own[1].rstrip('/')}/pgoom-gk-{uuid.uuid4().hex[:8]}"
    os.mkdir(directory)
    with open(f"{directory}/memory.limit_in_bytes", "w") as f:
        f.write(str(LIMIT_BYTES))
    yield directory
    # Whatever is left (the cluster is stopped by then) goes back to our own cgroup.
    with open(f"{directory}/cgroup.procs") as f:
        for pid in f.read().split():
            try:
                with open(f"{V1_ROOT}{own[1]}/cgroup.procs", "w") as back:
                    back.write(pid)
            except OSError:
                pass
    wait_for(lambda: _rmdir(directory), 10, 0.05, what=f"rmdir {directory}")


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
        return True
    except OSError:
        return False


@pytest.fixture
def in_cgroup(make_cluster: object, v1_cgroup: str) -> Iterator[tuple[Cluster, int, str]]:
    """A running cluster whose postmaster is in the v1 cgroup (moved after start; its later
    children are born there)."""
    cluster: Cluster = make_cluster()  # type: ignore[operator]
    pm = cluster.start()
    with open(f"{v1_cgroup}/cgroup.procs", "w") as f:
        f.write(str(pm))
    yield cluster, pm, v1_cgroup
    cluster.stop()


def test_status_shows_the_v1_cgroup_and_no_group_kill(in_cgroup: tuple[Cluster, int, str]) -> None:
    cluster, pm, directory = in_cgroup
    done = pgoom("status", "--json", "--score", "0", *own_rules(cluster))
    assert done.returncode == 0, done.stderr
    rows = {row["pid"]: row for row in json.loads(done.stdout)}
    cg = rows[pm]["cgroup"]
    assert cg["version"] == 1
    assert cg["directory"] == directory
    assert cg["limit_bytes"] == LIMIT_BYTES
    # v1 does not move a process's charge with it (move_charge_at_immigrate 0): the usage
    # is what the cgroup's own file says, whatever it is by now.
    assert isinstance(cg["usage_bytes"], int) and cg["usage_bytes"] >= 0
    assert cg["effective_limit_bytes"] == LIMIT_BYTES
    assert cg["group_kill"] is False
    assert rows[pm]["survives_group_kill"] is True
    table = pgoom("status", "--score", "0", *own_rules(cluster))
    assert table.returncode == 0, table.stderr
    line = next(x for x in table.stdout.splitlines() if x.split()[0] == str(pm))
    assert f"v1 {directory.removeprefix(V1_ROOT)}" in line


@pytest.mark.parametrize("policy", ["auto", "ungroup", "keep"])
def test_v1_every_policy_keeps_the_configured_score(
    in_cgroup: tuple[Cluster, int, str], policy: str
) -> None:
    """No group kill on v1: nothing to protect against, so each policy writes the configured
    score, logs no group-kill line and writes no cgroup file."""
    cluster, pm, _ = in_cgroup
    watcher = Watcher("--score", "0", "--group-kill", policy, *own_rules(cluster))
    try:
        log = watcher.wait_for_log(f"protected postmaster pid={pm} ", 30)
        assert read_score(pm) == 0
        assert "group kill" not in log and "memory.oom.group" not in log
        verify = pgoom("verify", "--score", "0", "--timeout", "5", *own_rules(cluster))
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        watcher.stop()


def test_minus_1000_refused_one_clear_error_and_pgoom_keeps_going(
    in_cgroup: tuple[Cluster, int, str],
) -> None:
    """Here no one may go below 0: -1000 is refused. pgoom says so once, names the
    capability, keeps running and retrying, and leaves the children where PostgreSQL put
    them (PG_OOM_ADJUST_VALUE, 1000 in the test clusters): a configured -1000 never makes
    pgoom write -1000 to a child."""
    cluster, pm, _ = in_cgroup
    watcher = Watcher(
        "--score", "-1000", "--verify-interval", "0.3", "--log-level", "DEBUG",
        *own_rules(cluster),
    )  # fmt: skip
    try:
        watcher.wait_ready(30)

        def refusals(level: str) -> list[str]:
            return [
                x
                for x in watcher.text().splitlines()
                if f" {level} " in x[:40] and "CAP_SYS_RESOURCE" in x
            ]

        # Every verify tick retries and meets the refusal again: at DEBUG after the first.
        wait_for(lambda: len(refusals("DEBUG")) >= 3, 30, 0.05, what="three retries")
        errors = refusals("ERROR")
        assert len(errors) == 1, errors
        assert f"pid {pm}" in errors[0]
        assert watcher.proc.poll() is None
        assert read_score(pm) == 1000  # the launcher's, as started
        backend = subprocess.Popen(cluster.psql_argv("-d", "postgres", "-c", "select pg_sleep(30)"))
        try:
            settled = wait_for(lambda: [c for c in _children(pm) if read_score(c) == 1000], 20)
            assert settled
            assert all(read_score(c) != -1000 for c in _children(pm))
        finally:
            backend.kill()
            backend.wait()
    finally:
        watcher.stop()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--group-kill", "never"], {}),
        ([], {"PGOOM_GROUP_KILL": "never"}),
    ],
)
def test_bad_policy_is_one_line_and_exit_2(args: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(
        [*PGOOM, "watch", "--log-file", "", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgoom: ")
    assert "'never' is unknown: use one of auto, ungroup, keep" in lines[0]
