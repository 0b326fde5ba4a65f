"""Real PostgreSQL clusters for the integration tests and the OOM harness.

A cluster runs as a dedicated user (uid 26, as in the Percona image) from a parent whose
oom_score_adj is 1000 (what a BestEffort pod gets): nobody here can go below 0, so
"protected" means the postmaster at 0 and everything else at 1000. Data directories live
under /pgdata/pg... so pgoom's default pattern `postgres -D /pgdata/pg` matches them.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

PG_UID = 26
PG_USER = "pgoom-pg"
PGDATA_ROOT = "/pgdata"


def pg_bindir() -> str:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4])
    )
    if not found:
        raise RuntimeError("no PostgreSQL server: run scripts/setup.sh")
    return os.path.dirname(found[-1])


def wait_for(
    condition: Callable[[], object],
    timeout_s: float = 10.0,
    interval_s: float = 0.01,
    what: str = "condition",
) -> object:
    """Poll `condition` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def ensure_pg_user() -> tuple[int, int]:
    """A system user with uid 26 (created if missing); returns (uid, gid)."""
    try:
        entry = pwd.getpwuid(PG_UID)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--uid",
                str(PG_UID),
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                PG_USER,
            ],
            check=True,
        )
        entry = pwd.getpwuid(PG_UID)
    return entry.pw_uid, entry.pw_gid


def pidfile_pid(data_dir: str) -> Optional[int]:
    """Line 1 of <data_dir>/postmaster.pid, once PostgreSQL has written it."""
    try:
        with open(f"{data_dir}/postmaster.pid") as f:
            first = f.readline().strip()
    except FileNotFoundError:
        return None
    return int(first) if first.isdigit() else None


def read_score(pid: int) -> int:
    with open(f"/proc/{pid}/oom_score_adj") as f:
        return int(f.read())


def children_settled_at(pm: int, score: int, minimum: int = 1, timeout_s: float = 10) -> list[int]:
    """Wait until at least `minimum` children of `pm` are alive and every one alive when read
    is at `score`; return their scores. A child caught between fork and its own write of
    PG_OOM_ADJUST_VALUE still shows the postmaster's score for a moment (longer on a busy
    machine): one snapshot would blame pgoom for PostgreSQL's timing. A child that stays
    elsewhere still fails the wait."""
    last: list[int] = []

    def settled() -> bool:
        nonlocal last
        last = []
        for child in children_of(pm):
            try:
                last.append(read_score(child))
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue  # exited meanwhile (autovacuum workers come and go)
        return len(last) >= minimum and set(last) == {score}

    try:
        wait_for(settled, timeout_s, 0.02, what=f"children of {pm} at {score}")
    except TimeoutError as err:
        raise AssertionError(f"children of {pm}: scores {last}, expected all {score}") from err
    return last


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def demote(uid: int, gid: int, score: Optional[int]) -> Callable[[], None]:
    def run() -> None:
        if score is not None:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write(str(score))
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return run


class Template:
    """One initdb per test session; clusters are copies of it (initdb costs seconds)."""

    def __init__(self) -> None:
        self.uid, self.gid = ensure_pg_user()
        self.bindir = pg_bindir()
        os.makedirs(PGDATA_ROOT, exist_ok=True)
        os.chmod(PGDATA_ROOT, 0o755)
        self.path = tempfile.mkdtemp(prefix="pgoom-template-", dir="/var/tmp")
        os.chown(self.path, self.uid, self.gid)
        subprocess.run(
            [
                f"{self.bindir}/initdb",
                "-D",
                self.path,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            preexec_fn=demote(self.uid, self.gid, None),
        )
        with open(f"{self.path}/postgresql.conf", "a") as conf:
            conf.write(
                "\nlisten_addresses = ''\nfsync = off\nsynchronous_commit = off\n"
                "full_page_writes = off\nshared_buffers = 16MB\nmax_connections = 60\n"
                "max_wal_size = 64MB\nlogging_collector = off\n"
            )

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@dataclass
class Cluster:
    template: Template
    name: str = field(default_factory=lambda: f"pgt{uuid.uuid4().hex[:8]}")
    launcher_score: Optional[int] = 1000
    children_score: Optional[int] = 1000  # PG_OOM_ADJUST_VALUE; None: do not set the env
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: Optional[subprocess.Popen[bytes]] = None

    def __post_init__(self) -> None:
        self.data_dir = f"{PGDATA_ROOT}/{self.name}"
        self.socket_dir = tempfile.mkdtemp(prefix="pgoom-sock-")
        os.chown(self.socket_dir, self.template.uid, self.template.gid)
        subprocess.run(["cp", "-a", self.template.path, self.data_dir], check=True)
        os.chmod(self.data_dir, 0o700)
        self.log_path = f"{self.socket_dir}/postgres.log"

    @property
    def bindir(self) -> str:
        return self.template.bindir

    def env(self) -> dict[str, str]:
        env = {"PATH": f"{self.bindir}:/usr/bin:/bin", "LANG": "C", **self.extra_env}
        if self.children_score is not None:
            env["PG_OOM_ADJUST_FILE"] = "/proc/self/oom_score_adj"
            env["PG_OOM_ADJUST_VALUE"] = str(self.children_score)
        return env

    def start(self, wait: bool = True) -> int:
        """Start `postgres -D <dir>` directly (the exec the watcher sees); returns the
        postmaster's PID."""
        log = open(self.log_path, "ab")
        # Owned by the cluster's user, so a later pg_ctl (running as that user) can append.
        os.chown(self.log_path, self.template.uid, self.template.gid)
        self.proc = subprocess.Popen(
            [f"{self.bindir}/postgres", "-D", self.data_dir, "-k", self.socket_dir],
            env=self.env(),
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            preexec_fn=self._preexec(),
            start_new_session=True,
        )
        log.close()
        if wait:
            self.wait_ready()
        return self.proc.pid

    def _preexec(self) -> Callable[[], None]:
        """What runs between fork and exec of the postmaster or pg_ctl: the launcher's
        score, then the cluster's user. Subclasses add steps (the OOM harness joins its
        memory cgroup first)."""
        return demote(self.template.uid, self.template.gid, self.launcher_score)

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [
                f"{self.bindir}/pg_ctl",
                "-D",
                self.data_dir,
                "-l",
                self.log_path,
                "-w",
                "-t",
                "60",
                "-o",
                f"-k {self.socket_dir}",
                *args,
            ],
            env=self.env(),
            check=check,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=self._preexec(),
            timeout=90,
        )

    def psql_argv(self, *args: str) -> list[str]:
        """psql over this cluster's unix socket as the superuser, unaligned and quiet."""
        return [
            f"{self.bindir}/psql",
            "-h",
            self.socket_dir,
            "-U",
            "postgres",
            "-XAtq",
            *args,
        ]

    def pidfile_pid(self) -> Optional[int]:
        return pidfile_pid(self.data_dir)

    def postmaster_pid(self) -> int:
        pid = wait_for(self.pidfile_pid, 30, what="postmaster.pid")
        assert isinstance(pid, int)
        return pid

    def is_ready(self) -> bool:
        return (
            subprocess.run(
                [f"{self.bindir}/pg_isready", "-q", "-h", self.socket_dir, "-U", "postgres"],
                check=False,
            ).returncode
            == 0
        )

    def wait_ready(self, timeout_s: float = 30) -> None:
        wait_for(self.is_ready, timeout_s, 0.05, what=f"{self.name} to accept connections")

    def psql(self, sql: str, check: bool = True, timeout_s: float = 60) -> str:
        done = subprocess.run(
            self.psql_argv("-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql),
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        return done.stdout.strip()

    def backend_pids(self) -> list[int]:
        pm = self.pidfile_pid()
        return children_of(pm) if pm else []

    def stop(self) -> None:
        pm = self.pidfile_pid()
        if (pm is None or not alive(pm)) and self.proc is not None and self.proc.poll() is None:
            pm = self.proc.pid  # stopped before it wrote postmaster.pid: the process we started
        if pm is not None and alive(pm):
            try:
                os.kill(pm, signal.SIGQUIT)  # immediate shutdown; our own process
            except ProcessLookupError:
                pass
            wait_for(lambda: not alive(pm), 30, 0.05, what="postmaster to stop")
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (nor dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
