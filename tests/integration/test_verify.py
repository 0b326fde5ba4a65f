"""`pgoom verify` against real PostgreSQL (uid 26, launched at oom_score_adj 1000) and a
real `pgoom watch`: exit 0 protected, 1 not protected in time, 3 no postmaster, 2 usage."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from typing import Any

import pytest

from tests.support.pg import Cluster, read_score
from tests.support.watcher import PGOOM, Watcher

pytestmark = pytest.mark.root


def cluster_args(cluster: Cluster) -> list[str]:
    # A pattern and a data-dir rule that name this cluster only (other postmasters may run
    # on a shared host, and the fallback must not pick them).
    return [
        "--pattern",
        rf"postgres -D {re.escape(cluster.data_dir)}(\s|$)",
        "--data-dir",
        cluster.data_dir,
    ]


def verify(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PGOOM, "verify", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture
def running(make_cluster: Any) -> Cluster:
    # /pgdata/vfy-*: outside pgoom's default pattern, so no other watcher on the host
    # protects it by accident.
    cluster: Cluster = make_cluster(name=f"vfy-{os.urandom(4).hex()}")
    cluster.start()
    return cluster


def test_unprotected_postmaster_exits_1_with_one_line(running: Cluster) -> None:
    pm = running.postmaster_pid()
    with open(f"/proc/{pm}/oom_score_adj", "w") as f:
        f.write("1000")  # as launched; raising is always allowed
    done = verify("--score", "0", "--timeout", "0.3", *cluster_args(running))
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("pgoom: not protected within 0.3 s:")
    assert f"pid {pm} ({running.data_dir}) oom_score_adj 1000" in lines[0]


def test_protected_by_a_real_watcher_exits_0(running: Cluster) -> None:
    pm = running.postmaster_pid()
    watcher = Watcher("--score", "0", *cluster_args(running))
    try:
        watcher.wait_ready()
        done = verify("--score", "0", "--timeout", "10", *cluster_args(running))
        # The -900 default cannot be met here (no CAP_SYS_RESOURCE): 0 is not at or below it.
        default = verify("--timeout", "0", *cluster_args(running))
    finally:
        watcher.stop()
    assert done.returncode == 0, done.stderr
    assert read_score(pm) == 0
    assert done.stdout.startswith("ok: 1 postmaster(s) at or below 0:")
    assert f"pid {pm}" in done.stdout
    assert default.returncode == 1
    assert "expected at or below -900" in default.stderr


def test_waits_until_the_watcher_protects(running: Cluster) -> None:
    """verify started first, the watcher afterwards: verify polls and then exits 0."""
    pm = running.postmaster_pid()
    with open(f"/proc/{pm}/oom_score_adj", "w") as f:
        f.write("1000")
    start = time.monotonic()
    probe = subprocess.Popen(
        [*PGOOM, "verify", "--score", "0", "--timeout", "30", "--json", *cluster_args(running)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watcher = Watcher("--score", "0", *cluster_args(running))
    try:
        out, err = probe.communicate(timeout=60)
    finally:
        watcher.stop()
        if probe.poll() is None:
            probe.kill()
            probe.wait()
    assert probe.returncode == 0, err
    doc = json.loads(out)
    assert doc["ok"] is True
    assert [p["pid"] for p in doc["postmasters"]] == [pm]
    assert doc["postmasters"][0]["oom_score_adj"] == 0
    assert doc["elapsed_s"] < 30
    assert time.monotonic() - start < 30


def test_no_postmaster_exits_3(tmp_path: Any) -> None:
    missing = f"/pgdata/vfy-missing-{os.urandom(4).hex()}"
    done = verify(
        "--score",
        "0",
        "--timeout",
        "0.2",
        "--pattern",
        rf"postgres -D {missing}(\s|$)",
        "--data-dir",
        missing,
    )
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("pgoom: no postmaster found within 0.2 s")


def test_stopped_cluster_is_not_found(running: Cluster) -> None:
    args = cluster_args(running)
    assert verify("--score", "1000", "--timeout", "5", *args).returncode == 0
    running.stop()
    assert verify("--score", "1000", "--timeout", "0.2", *args).returncode == 3


@pytest.mark.parametrize(
    "args",
    [["--timeout", "-1"], ["--score", "5000"], ["--pattern", "("], ["--data-dir", "rel/dir"]],
)
def test_bad_options_exit_2_without_traceback(args: list[str]) -> None:
    done = verify(*args, "--timeout", "0") if "--timeout" not in args else verify(*args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("pgoom: ")
