"""`pgoom status` and `pgoom adjust` against a real PostgreSQL cluster on the real kernel."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator

import pytest

from tests.support.pg import Cluster, Template, children_of, read_score, wait_for
from tests.support.watcher import PGOOM

pytestmark = pytest.mark.root


def pgoom(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGOOM_")}
    return subprocess.run(
        [*PGOOM, *args], check=False, capture_output=True, text=True, timeout=30, env=env
    )


def one_line_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    assert done.returncode == code, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgoom: "), done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def cluster_with_backend(pg_template: Template) -> Iterator[tuple[Cluster, int, int]]:
    """One started cluster with one busy backend for the module: (cluster, pm, backend)."""
    cluster = Cluster(pg_template)
    session = None
    try:
        pm = cluster.start()
        aux = set(children_of(pm))
        session = subprocess.Popen(
            cluster.psql_argv("-c", "select pg_sleep(300)"),
            stdout=subprocess.DEVNULL,
        )
        backend = wait_for(
            lambda: next(iter(set(children_of(pm)) - aux), None), 10, what="a backend"
        )
        assert isinstance(backend, int)
        yield cluster, pm, backend
    finally:
        if session is not None:
            session.kill()
            session.wait()
        cluster.destroy()


@pytest.fixture
def running(cluster_with_backend: tuple[Cluster, int, int]) -> tuple[Cluster, int, int]:
    """The module's cluster with every process back at 1000 (raising is always allowed)."""
    _, pm, _ = cluster_with_backend
    for pid in [pm, *children_of(pm)]:
        try:
            with open(f"/proc/{pid}/oom_score_adj", "w") as f:
                f.write("1000")
        except FileNotFoundError:  # an autovacuum worker that finished meanwhile
            continue
    return cluster_with_backend


def status_rows(*args: str) -> dict[int, dict[str, object]]:
    done = pgoom("status", "--json", *args)
    assert done.returncode == 0, done.stderr
    return {row["pid"]: row for row in json.loads(done.stdout)}


def test_status_json_roles_and_protection(running: tuple[Cluster, int, int]) -> None:
    cluster, pm, backend = running
    rows = status_rows("--score", "0")
    row = rows[pm]
    assert row["role"] == "postmaster"
    assert row["data_dir"] == cluster.data_dir
    # 1000 as started; 0 only if another watcher on a shared host got there first.
    assert row["oom_score_adj"] in (1000, 0)
    assert row["protected"] is (row["oom_score_adj"] == 0)
    assert isinstance(row["rss_kib"], int) and row["rss_kib"] > 0
    assert isinstance(row["oom_score"], int)
    assert rows[backend]["role"] == "backend"
    assert rows[backend]["protected"] is None
    assert rows[backend]["data_dir"] == cluster.data_dir
    aux = [p for p in children_of(pm) if p != backend]
    assert aux
    # The checkpointer, walwriter, ... are aux; only the session is a backend.
    roles = {p: rows[p]["role"] for p in aux if p in rows}
    assert roles and set(roles.values()) == {"aux"}, roles

    adjusted = pgoom("adjust", str(pm), "--score", "0")
    assert adjusted.returncode == 0, adjusted.stderr
    rows = status_rows("--score", "0")
    assert rows[pm]["oom_score_adj"] == 0
    assert rows[pm]["protected"] is True
    # With the -900 default as the target, 0 is not protected enough.
    assert status_rows()[pm]["protected"] is False


def test_status_pattern_decides_which_postmasters_are_judged(
    running: tuple[Cluster, int, int],
) -> None:
    cluster, pm, _ = running
    row = status_rows("--score", "0", "--pattern", "no-such-cluster")[pm]
    assert row["role"] == "postmaster"
    assert row["protected"] is None and row["note"] == "no --pattern covers it"
    row = status_rows("--score", "0", "--pattern", re.escape(cluster.data_dir))[pm]
    assert row["protected"] is (row["oom_score_adj"] == 0)


def test_status_table(running: tuple[Cluster, int, int]) -> None:
    _, pm, backend = running
    done = pgoom("status", "--score", "0")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["PID", "PPID", "ROLE"]
    pm_line = next(x for x in lines if x.split()[0] == str(pm))
    assert pm_line.split()[2] == "postmaster"
    assert pm_line.split()[-1] == "NO"
    assert next(x for x in lines if x.split()[0] == str(backend)).split()[2] == "backend"


def test_adjust_postmaster(running: tuple[Cluster, int, int]) -> None:
    _, pm, _ = running
    done = pgoom("adjust", str(pm), "--score", "0")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(rf"pid {pm}: oom_score_adj (1000|0) -> 0", done.stdout.strip())
    assert read_score(pm) == 0
    again = pgoom("adjust", str(pm), "--score", "0")  # idempotent
    assert again.returncode == 0
    assert again.stdout.strip() == f"pid {pm}: oom_score_adj 0 -> 0"


def test_adjust_refuses_a_backend_unless_forced(running: tuple[Cluster, int, int]) -> None:
    _, pm, backend = running
    line = one_line_error(pgoom("adjust", str(backend), "--score", "0"), 5)
    assert f"pid {backend} is not a postmaster: a backend or auxiliary process" in line
    assert "--force" in line
    assert read_score(backend) == 1000
    aux = next(p for p in children_of(pm) if p != backend)
    one_line_error(pgoom("adjust", str(aux), "--score", "0"), 5)
    forced = pgoom("adjust", str(backend), "--score", "0", "--force")
    assert forced.returncode == 0, forced.stderr
    assert read_score(backend) == 0


def test_adjust_refuses_a_look_alike() -> None:
    sleeper = subprocess.Popen(["postgres -D /pgdata/pg16", "60"], executable="/bin/sleep")
    try:
        wait_for(lambda: "sleep" in os.readlink(f"/proc/{sleeper.pid}/exe"), 5)
        line = one_line_error(pgoom("adjust", str(sleeper.pid), "--score", "0"), 5)
        assert "executable is sleep, not postgres" in line
    finally:
        sleeper.kill()
        sleeper.wait()


def test_adjust_no_such_pid() -> None:
    with open("/proc/sys/kernel/pid_max") as f:
        beyond = int(f.read()) + 1
    line = one_line_error(pgoom("adjust", str(beyond), "--score", "0"), 3)
    assert line == f"pgoom: no process with pid {beyond}"


def test_adjust_default_score_is_denied_with_the_cause(
    running: tuple[Cluster, int, int],
) -> None:
    _, pm, _ = running
    line = one_line_error(pgoom("adjust", str(pm)), 4)
    assert re.search(rf"cannot lower oom_score_adj of pid {pm} from (1000|0) to -900: ", line)
    assert "CAP_SYS_RESOURCE" in line
    assert "--cap-add SYS_RESOURCE" in line
    assert read_score(pm) != -900
