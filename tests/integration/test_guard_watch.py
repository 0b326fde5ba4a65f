"""`pgoom watch --guard` end to end: a real watcher process protects a real postmaster in a
real cgroup v1 memory cgroup and cancels its runaway query before the kernel acts."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from scripts.oomharness.cgroup import MemoryCgroup
from scripts.oomharness.pgcluster import HarnessCluster, Session
from tests.support.guardloop import v1_memcg
from tests.support.pg import Template, alive, read_score, wait_for
from tests.support.watcher import Watcher

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (memory cgroups)")

BIG_QUERY = "select array_length(array_agg(g), 1) from (select generate_series(1, 150000000) g) s;"


@pytest.fixture
def memcg() -> Iterator[MemoryCgroup]:
    yield from v1_memcg(300 << 20, "pgoom-guard-watch")


@pytest.fixture
def cluster(pg_template: Template, memcg: MemoryCgroup) -> Iterator[HarnessCluster]:
    c = HarnessCluster(pg_template, memcg.procs_file, launcher_score=1000, children_score=1000)
    yield c
    c.destroy()


@pytest.mark.parametrize("dry_run", [False, True])
def test_watch_guard_cancels_the_runaway_query(
    cluster: HarnessCluster, memcg: MemoryCgroup, dry_run: bool
) -> None:
    args = ["--score", "0", "--pattern", cluster.pattern, "--data-dir", cluster.data_dir]
    watcher = Watcher(*args, "--guard-dry-run" if dry_run else "--guard")
    try:
        watcher.wait_ready(30)
        cluster.start()
        pm = cluster.postmaster_pid()
        wait_for(lambda: read_score(pm) == 0, 10, 0.01, what="the postmaster protected")
        watcher.wait_for_log(f"guard: watching postmaster {pm}", 10)
        bystander, runaway = Session(cluster), Session(cluster)
        assert bystander.run("select 1;").ok and runaway.run("select 1;").ok
        oom_before = memcg.oom_kills()
        result = runaway.run(BIG_QUERY, timeout_s=120)
        if dry_run:
            # Nothing signalled: the kernel kills the backend, PostgreSQL resets everyone.
            watcher.wait_for_log("guard: would send SIGINT", 10)
            assert memcg.oom_kills() > oom_before
            assert "guard: sent" not in watcher.text()
        else:
            assert any("canceling statement due to user request" in x for x in result.lines)
            text = watcher.wait_for_log("guard: sent SIGINT to client backend", 10)
            assert "relieved in" in text
            assert memcg.oom_kills() == oom_before
            assert bystander.run("select 1;").ok  # nobody else noticed
            assert runaway.run("select 1;").ok  # not even the runaway's own session
        assert alive(pm)
        bystander.close()
        runaway.close()
    finally:
        assert watcher.stop() == 0, watcher.text()
