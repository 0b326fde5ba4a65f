"""`pgoom watch` across its three sources on the real kernel, with real PostgreSQL 15.

Clusters run as uid 26 from a parent at oom_score_adj 1000 and reset their children to 1000
(PG_OOM_ADJUST_VALUE); pgoom targets 0, the lowest anyone can reach here. Each watcher gets
rules that match only its test's clusters: other tests' clusters on the host stay untouched.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.pg import Cluster, alive, children_of, children_settled_at, read_score, wait_for
from tests.support.watcher import Watcher

pytestmark = pytest.mark.root

MakeCluster = Callable[..., Cluster]
SOURCES = ["netlink", "inotify", "poll"]
NOBODY = 65534


def own_rules(*clusters: Cluster) -> list[str]:
    """A pattern and a data-dir rule per cluster: nothing else on the host matches, and a
    data-dir rule keeps the fallbacks (the parent of other postgres processes, the only
    one) from guessing at other clusters."""
    args: list[str] = []
    for cluster in clusters:
        args += ["--pattern", re.escape(f"postgres -D {cluster.data_dir}") + "(?: |$)"]
        args += ["--data-dir", cluster.data_dir]
    return args


def source_args(source: str) -> list[str]:
    """A short interval so the poll source (and child scans without netlink) react quickly.
    The poll source examines a PID once, when it is new: caught between fork and exec it
    is never looked at again until the periodic full rescan (the verify tick), so poll
    tests rescan every second."""
    args = ["--source", source, "--interval", "0.2"]
    return [*args, "--verify-interval", "1"] if source == "poll" else args


def log_lines(watcher: Watcher, needle: str) -> list[str]:
    return [line for line in watcher.text().splitlines() if needle in line]


def wait_score(pid: int, score: int, timeout_s: float = 10) -> None:
    wait_for(lambda: read_score(pid) == score, timeout_s, what=f"pid {pid} at {score}")


def backend_score(cluster: Cluster) -> int:
    """A fresh backend reads its own oom_score_adj (the test connects as superuser)."""
    return int(cluster.psql("select pg_read_file('/proc/self/oom_score_adj')"))


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    """Watchers a test started; each must have exited 0 on SIGTERM by the end."""
    started: list[Watcher] = []
    yield started
    codes = [w.stop() for w in started]
    for w in started:  # shown by pytest when the test failed
        print(f"--- pgoom log ({w.proc.args!r}):\n{w.text()}")
    for w in started:
        shutil.rmtree(w.log_dir, ignore_errors=True)
    assert codes == [0] * len(started)


def start_watcher(watchers: list[Watcher], *args: str) -> Watcher:
    watcher = Watcher(*args)
    watchers.append(watcher)
    watcher.wait_ready()
    return watcher


# --- protection through the postmaster's life ---------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
def test_postmaster_protected_through_restart_and_kill(
    source: str, make_cluster: MakeCluster, watchers: list[Watcher]
) -> None:
    cluster = make_cluster()
    watcher = start_watcher(watchers, *source_args(source), "--score", "0", *own_rules(cluster))
    assert f"source: {source} (asked for)" in watcher.text()

    cluster.start()
    pm = cluster.postmaster_pid()
    wait_score(pm, 0)
    done = log_lines(watcher, f"protected postmaster pid={pm} ")
    if done:
        assert f"data_dir={cluster.data_dir}" in done[0]
        assert "oom_score_adj 1000 -> 0" in done[0]
        assert f"source={source}" in done[0]
    else:  # only where another watcher on a shared host (another test) got there first
        watcher.wait_for_log(f"postmaster pid={pm} data_dir={cluster.data_dir} already at", 5)
    children_settled_at(pm, 1000)  # the auxiliary processes
    assert backend_score(cluster) == 1000

    # pg_ctl restart: a new postmaster (through pg_ctl's shell) under the same data dir.
    # Cluster.start() created the log as root; pg_ctl (uid 26) must append to it.
    os.chown(cluster.log_path, cluster.template.uid, cluster.template.gid)
    cluster.pg_ctl("restart", "-m", "fast")
    restarted = cluster.postmaster_pid()
    assert restarted != pm
    wait_score(restarted, 0)
    assert backend_score(cluster) == 1000

    # kill -9: the stale postmaster.pid stays; a new start must be protected too. The
    # victim is one this test's process starts (and reaps): PID 1 here does not reap
    # orphans, and PostgreSQL takes a zombie named in its lock file for a live postmaster.
    cluster.pg_ctl("stop", "-m", "fast")
    direct = cluster.start()
    wait_score(direct, 0)
    old_children = children_of(direct)
    os.kill(direct, signal.SIGKILL)
    assert cluster.proc is not None
    cluster.proc.wait(timeout=10)
    wait_for(
        lambda: not any(alive(p) for p in old_children),
        15,
        0.05,
        what="the killed postmaster's children to exit",
    )
    assert cluster.pidfile_pid() == direct  # stale
    cluster.start()
    again = cluster.postmaster_pid()
    assert again not in (pm, restarted, direct)
    wait_score(again, 0)
    children_settled_at(again, 1000)
    assert backend_score(cluster) == 1000
    assert watcher.proc.poll() is None
    assert "Traceback" not in watcher.text()


# --- look-alikes ------------------------------------------------------------------------------


def at_1000(uid: int = 0) -> Callable[[], None]:
    def run() -> None:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
        if uid:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    return run


def full_pipe() -> tuple[int, int]:
    """A pipe whose buffer is full: a process writing to it blocks (and stays alive)."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"x" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    return r, w


@pytest.mark.parametrize("source", SOURCES)
def test_look_alikes_stay_untouched(
    source: str, make_cluster: MakeCluster, watchers: list[Watcher]
) -> None:
    cluster = make_cluster()  # its data directory (uid 26) is what the look-alikes name
    data_dir = cluster.data_dir
    tmp = tempfile.mkdtemp(prefix="pgoom-lookalike-")
    os.chmod(tmp, 0o755)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    fds: list[int] = []
    try:
        watcher = start_watcher(watchers, *source_args(source), "--score", "0", *own_rules(cluster))
        # (a) sleep whose argv claims to be `postgres -D <dir>`.
        procs["sleep"] = subprocess.Popen(
            [f"postgres -D {data_dir}", "300"], executable="/bin/sleep", preexec_fn=at_1000()
        )
        # (b), (c) scripts called postgres: the kernel runs their interpreter.
        for name, body in (("sh", "#!/bin/sh\nread x\n"), ("py", "#!/usr/bin/python3\ninput()\n")):
            os.makedirs(f"{tmp}/{name}")
            script = f"{tmp}/{name}/postgres"
            with open(script, "w") as f:
                f.write(body)
            os.chmod(script, 0o755)
            procs[name] = subprocess.Popen(
                [script, "-D", data_dir], stdin=subprocess.PIPE, preexec_fn=at_1000()
            )
        # (d) a copy of sleep that really is called postgres, run by root with PGDATA set:
        # the binary's name passes, its content (no PostmasterMain) does not.
        shutil.copy("/bin/sleep", f"{tmp}/postgres")
        procs["copy"] = subprocess.Popen(
            [f"postgres -D {data_dir}", "300"],
            executable=f"{tmp}/postgres",
            env={"PGDATA": data_dir},
            preexec_fn=at_1000(),
        )
        # (e) the real postgres binary started by another uid than the data dir's owner: it
        # fails, and stays alive writing its FATAL into a full pipe.
        r, w = full_pipe()
        fds += [r, w]
        procs["uid"] = subprocess.Popen(
            [f"{cluster.bindir}/postgres", "-D", data_dir],
            stdout=w,
            stderr=w,
            preexec_fn=at_1000(NOBODY),
        )
        os.close(w)
        fds.remove(w)
        # A lock file naming the sleep, so that inotify examines it too.
        with open(f"{data_dir}/postmaster.pid", "w") as f:
            f.write(f"{procs['sleep'].pid}\n{data_dir}\n")

        reasons = {
            "sleep": "executable is sleep, not postgres",
            "sh": "executable is dash, not postgres",
            "py": "executable is python3",
            "copy": "executable postgres is not a PostgreSQL server binary",
            "uid": f"belongs to uid 26, the process runs as uid {NOBODY}",
        }
        # inotify learns only of the PID its lock file names; the others see every exec.
        expected = ["sleep"] if source == "inotify" else list(reasons)
        for name in expected:
            pid = procs[name].pid
            log = watcher.wait_for_log(f"not protecting pid {pid} ")
            line = next(x for x in log.splitlines() if f"not protecting pid {pid} " in x)
            assert reasons[name] in line, line
        for name, proc in procs.items():
            assert proc.poll() is None, f"look-alike {name} exited"
            assert read_score(proc.pid) == 1000, f"look-alike {name} was adjusted"
        assert "protected postmaster" not in watcher.text()
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
        for fd in fds:
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            os.unlink(f"{data_dir}/postmaster.pid")
        except FileNotFoundError:
            pass


# --- the -900 default without CAP_SYS_RESOURCE ---------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
def test_default_score_reports_eacces_once_and_keeps_watching(
    source: str, make_cluster: MakeCluster, watchers: list[Watcher]
) -> None:
    first, second = make_cluster(), make_cluster()
    watcher = start_watcher(
        watchers, *source_args(source), "--verify-interval", "0.2", *own_rules(first, second)
    )
    first.start()
    pm1 = first.postmaster_pid()
    # "from 1000": unless another watcher on this host got there first.
    watcher.wait_for_log(f"cannot lower oom_score_adj of pid {pm1} from ")
    second.start()  # started later: still examined, still reported
    pm2 = second.postmaster_pid()
    watcher.wait_for_log(f"cannot lower oom_score_adj of pid {pm2} from ")
    # Starting the second cluster took several verify ticks (each retries pm1 and is
    # refused); new backends give poll and netlink more processes to look at.
    for cluster in (first, second):
        cluster.psql("select 1")
    for pm in (pm1, pm2):
        lines = log_lines(watcher, f"cannot lower oom_score_adj of pid {pm} ")
        assert len(lines) == 1, lines  # once per postmaster, not once per attempt
        assert "ERROR" in lines[0]
        assert "CAP_SYS_RESOURCE" in lines[0]
        assert "oom_score_adj_min" in lines[0]
        assert " to -900: " in lines[0]
    assert watcher.proc.poll() is None
    assert "Traceback" not in watcher.text()


# --- drift repair, children, dry run ------------------------------------------------------------


def test_drift_is_repaired(make_cluster: MakeCluster, watchers: list[Watcher]) -> None:
    cluster = make_cluster()
    watcher = start_watcher(
        watchers,
        "--source",
        "netlink",
        "--score",
        "0",
        "--verify-interval",
        "0.3",
        *own_rules(cluster),
    )
    cluster.start()
    pm = cluster.postmaster_pid()
    wait_score(pm, 0)
    with open(f"/proc/{pm}/oom_score_adj", "w") as f:  # what a runtime might do
        f.write("1000")
    wait_score(pm, 0, 5)
    line = watcher.wait_for_log(f"drift repaired: postmaster pid={pm} ")
    assert "had oom_score_adj 1000, set back to 0" in line


@pytest.mark.parametrize("source", SOURCES)
def test_children_score_without_pg_oom_env(
    source: str, make_cluster: MakeCluster, watchers: list[Watcher]
) -> None:
    """PostgreSQL started without PG_OOM_ADJUST_*: new children inherit the postmaster's 0
    unless pgoom sets them (fork events with netlink, child scans otherwise)."""
    cluster = make_cluster(children_score=None)
    start_watcher(
        watchers,
        *source_args(source),
        "--score",
        "0",
        "--children-score",
        "1000",
        *own_rules(cluster),
    )
    cluster.start()
    pm = cluster.postmaster_pid()
    wait_score(pm, 0)
    before = set(children_of(pm))
    session = subprocess.Popen(
        cluster.psql_argv("-c", "select pg_sleep(30)"),
        stdout=subprocess.DEVNULL,
    )
    try:
        backend = wait_for(
            lambda: next(iter(set(children_of(pm)) - before), None), 10, what="a new backend"
        )
        assert isinstance(backend, int)
        wait_score(backend, 1000, 10)
        assert read_score(pm) == 0
    finally:
        session.kill()
        session.wait()


def test_dry_run_writes_nothing(make_cluster: MakeCluster, watchers: list[Watcher]) -> None:
    cluster = make_cluster()
    watcher = start_watcher(
        watchers,
        "--source",
        "poll",
        "--interval",
        "0.2",
        "--score",
        "500",
        "--dry-run",
        "--verify-interval",
        "0.2",
        "--log-level",
        "debug",
        *own_rules(cluster),
    )
    assert "dry run: nothing will be written" in watcher.text()
    cluster.start()
    pm = cluster.postmaster_pid()
    log = watcher.wait_for_log(f"dry run: would set postmaster pid={pm} ")
    assert re.search(rf"pid={pm} data_dir={cluster.data_dir} oom_score_adj \d+ -> 500\n", log)
    # Two periodic rescans (each also a verify tick) later, still untouched.
    scans = len(log_lines(watcher, "scanning /proc (periodic)"))
    wait_for(
        lambda: len(log_lines(watcher, "scanning /proc (periodic)")) >= scans + 2,
        10,
        what="periodic rescans",
    )
    assert read_score(pm) != 500  # 1000, or 0 if another watcher on this host acted
    assert "protected postmaster" not in watcher.text()
    assert "drift repaired" not in watcher.text()


# --- shutdown ------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(source: str, sig: signal.Signals) -> None:
    data_dir = tempfile.mkdtemp(prefix="pgoom-stop-")
    watcher = Watcher(*source_args(source), "--score", "0", "--data-dir", data_dir)
    try:
        watcher.wait_ready()
        sent = time.monotonic()
        os.kill(watcher.proc.pid, sig)
        code = watcher.proc.wait(timeout=5)
        elapsed_s = time.monotonic() - sent
        assert code == 0, watcher.text()
        assert elapsed_s < 2.0
        assert watcher.text().rstrip().endswith("stopped")
    finally:
        watcher.stop()
        shutil.rmtree(watcher.log_dir, ignore_errors=True)
        os.rmdir(data_dir)
