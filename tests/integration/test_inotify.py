"""The inotify source on the real kernel, alone and inside `pgoom watch` with a real
PostgreSQL 15 started as uid 26 from a parent at oom_score_adj 1000 (nobody here can go
below 0, so protected means the postmaster at 0 while everything else stays at 1000)."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Callable

import pytest

from tests.support.pg import (
    PGDATA_ROOT,
    Cluster,
    Template,
    alive,
    children_settled_at,
    read_score,
    wait_for,
)
from tests.support.watcher import Watcher
from watcher.sources.base import Event, Examine
from watcher.sources.inotify import InotifySource

pytestmark = pytest.mark.root


def drain(
    source: InotifySource, until: Callable[[list[Event]], bool], timeout_s: float = 5.0
) -> list[Event]:
    """Collect events until `until(collected)` holds, waiting on the descriptor (bounded)."""
    collected: list[Event] = []

    def step() -> bool:
        fd = source.fileno()
        assert fd is not None
        select.select([fd], [], [], 0.05)
        collected.extend(source.read())
        return until(collected)

    wait_for(step, timeout_s, 0, what="inotify events")
    return collected


def write_like_postgres(data_dir: Path, pid: int) -> None:
    """What CreateLockFile and AddToDataDirLockFile do: O_CREAT|O_EXCL, one write with the
    first lines, close; then several open/rewrite/close rounds adding lines."""
    path = data_dir / "postmaster.pid"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, f"{pid}\n{data_dir}\n1700000000\n5432\n".encode())
    os.close(fd)
    lines = f"{pid}\n{data_dir}\n1700000000\n5432\n"
    for extra in ("/tmp", "*", "  5432001     32768", "starting", "ready   "):
        lines += extra + "\n"
        fd = os.open(path, os.O_RDWR)
        os.write(fd, lines.encode())
        os.close(fd)


def test_lock_file_written_like_postgres_is_announced_once(tmp_path: Path, sleeper: int) -> None:
    source = InotifySource([str(tmp_path)])
    source.open()
    try:
        assert source.timeout_s() is None and source.fileno() is not None
        write_like_postgres(tmp_path, sleeper)
        events = drain(source, lambda got: any(isinstance(e, Examine) for e in got))
        # Let the rest of the writes arrive; none may announce the PID again.
        events += drain(source, lambda _: source.stats()["events"] >= 13)
        examines = [e for e in events if isinstance(e, Examine)]
        assert [e.pid for e in examines] == [sleeper]
        assert examines[0].ts_ns > 0
        # Clean stop then a new start: announced again.
        (tmp_path / "postmaster.pid").unlink()
        write_like_postgres(tmp_path, sleeper)
        events = drain(source, lambda got: any(isinstance(e, Examine) for e in got))
        assert [e.pid for e in events if isinstance(e, Examine)] == [sleeper]
    finally:
        source.close()
        source.close()  # idempotent
    assert source.fileno() is None


def test_directory_created_later_removed_and_recreated(tmp_path: Path, sleeper: int) -> None:
    data_dir = tmp_path / "deep" / "er" / "pg16"
    source = InotifySource([str(data_dir)])
    source.open()
    try:
        assert str(tmp_path) in source._watches  # waiting on the nearest existing ancestor
        data_dir.mkdir(parents=True)
        wait_for(lambda: source.read() is not None and str(data_dir) in source._watches, 5)
        write_like_postgres(data_dir, sleeper)
        events = drain(source, lambda got: any(isinstance(e, Examine) for e in got))
        assert [e.pid for e in events if isinstance(e, Examine)] == [sleeper]

        # Removed: back to waiting; recreated with a lock file already inside (written
        # before the watch could follow): announced when the directory is armed again.
        shutil.rmtree(tmp_path / "deep")
        wait_for(lambda: source.read() is not None and str(data_dir) not in source._watches, 5)
        staging = tmp_path / "staging"
        staging.mkdir()
        (staging / "postmaster.pid").write_text(f"{sleeper}\n{data_dir}\n")
        data_dir.parent.mkdir(parents=True)
        staging.rename(data_dir)
        events = drain(source, lambda got: any(isinstance(e, Examine) for e in got))
        assert [e.pid for e in events if isinstance(e, Examine)] == [sleeper]
        assert source.stats()["watches"] == 1
    finally:
        source.close()


def test_data_dir_added_at_runtime(tmp_path: Path, sleeper: int) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    source = InotifySource([str(first)])
    source.open()
    try:
        source.add_data_dir(str(second))
        source.add_data_dir(str(second))  # twice: no second watch
        assert source.stats()["watches"] == 2
        write_like_postgres(second, sleeper)
        events = drain(source, lambda got: any(isinstance(e, Examine) for e in got))
        assert [e.pid for e in events if isinstance(e, Examine)] == [sleeper]
    finally:
        source.close()


# --- pgoom watch --source inotify with a real postmaster ----------------------------------


def _protected(pid: int) -> bool:
    try:
        return read_score(pid) == 0
    except FileNotFoundError:
        return False


def test_watch_protects_postmaster_through_restarts(
    make_cluster: Callable[..., Cluster], pg_template: Template
) -> None:
    # Not /pgdata/pg...: the default pattern of other watchers must not race this one.
    name = f"ino{uuid.uuid4().hex[:8]}"
    data_dir = f"{PGDATA_ROOT}/{name}"
    lookalike_dir = f"{PGDATA_ROOT}/{name}-fake"
    watcher = Watcher(
        "--source",
        "inotify",
        # Only our clusters: the start-up scan must not touch other postmasters.
        "--pattern",
        f"postgres -D {re.escape(data_dir)}( |$)",
        "--data-dir",
        data_dir,  # does not exist yet: created by make_cluster below
        "--data-dir",
        lookalike_dir,
        "--score",
        "0",
        "--log-level",
        "DEBUG",
    )
    fake: subprocess.Popen[bytes] | None = None
    try:
        watcher.wait_ready()
        assert "source: inotify (asked for)" in watcher.text()

        # 1. First start: the data directory appears, then the postmaster writes its lock.
        cluster = make_cluster(name=name)
        pm = cluster.start(wait=False)
        wait_for(lambda: _protected(pm), 10, what="postmaster protected")
        log = watcher.wait_for_log(f"protected postmaster pid={pm} ")
        line = next(x for x in log.splitlines() if f"protected postmaster pid={pm} " in x)
        assert "source=inotify" in line and "latency_us=-" not in line
        cluster.wait_ready()
        children_settled_at(cluster.postmaster_pid(), 1000, minimum=3)

        # 2. Crash-restart: a child killed by SIGKILL makes the postmaster reinitialise.
        victim = cluster.backend_pids()[0]
        before = set(cluster.backend_pids())
        os.kill(victim, signal.SIGKILL)  # our cluster's process
        wait_for(lambda: not (set(cluster.backend_pids()) & before), 20, what="reinit")
        cluster.wait_ready()
        assert cluster.pidfile_pid() == pm and read_score(pm) == 0
        children_settled_at(cluster.postmaster_pid(), 1000, minimum=3)

        # 3. Clean stop, then start again: a new PID, protected by the lock-file event.
        cluster.stop()
        pm2 = cluster.start(wait=False)
        assert pm2 != pm
        wait_for(lambda: _protected(pm2), 10, what="restarted postmaster protected")
        cluster.wait_ready()
        children_settled_at(cluster.postmaster_pid(), 1000, minimum=3)

        # 4. SIGKILL of the postmaster leaves a stale postmaster.pid; start again.
        kids = cluster.backend_pids()
        os.kill(pm2, signal.SIGKILL)
        assert cluster.proc is not None
        cluster.proc.wait(timeout=10)  # reap it, or the stale PID would look alive
        wait_for(lambda: not any(alive(k) for k in kids), 20, what="orphans to exit")
        assert cluster.pidfile_pid() == pm2  # the stale file is still there
        pm3 = cluster.start(wait=False)
        wait_for(lambda: _protected(pm3), 10, what="postmaster after SIGKILL protected")
        cluster.wait_ready()
        children_settled_at(cluster.postmaster_pid(), 1000, minimum=3)

        # 5. A look-alike: a shell named postgres, run as the data directory's owner, writes
        # a lock file naming itself. It must not be protected.
        os.makedirs(lookalike_dir, mode=0o700)
        os.chown(lookalike_dir, pg_template.uid, pg_template.gid)
        script = 'printf "%s\\n%s\\n" $$ "$2" > "$2/postmaster.pid"; sleep 60; :'
        fake = subprocess.Popen(
            ["postgres", "-c", script, "sh", "-D", lookalike_dir],
            executable="/bin/sh",
            preexec_fn=_as_pg_user(pg_template),
        )
        watcher.wait_for_log(f"not protecting pid {fake.pid}")
        assert read_score(fake.pid) == 1000
        assert watcher.proc.poll() is None
    finally:
        if fake is not None:
            fake.kill()
            fake.wait()
        shutil.rmtree(lookalike_dir, ignore_errors=True)
        code = watcher.stop()
    assert code == 0, watcher.text()


def _as_pg_user(template: Template) -> Callable[[], None]:
    def run() -> None:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
        os.setgroups([])
        os.setgid(template.gid)
        os.setuid(template.uid)

    return run
