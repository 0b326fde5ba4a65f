"""PostgreSQL for the harness: tests.support.pg's Cluster, started inside the memory cgroup,
plus client sessions (psql over the unix socket) that hold memory in their backends."""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from scripts.oomharness.cgroup import enter
from tests.support.pg import Cluster, Template, alive, children_of, demote, wait_for

# Settings for the harness's clusters, appended after the template's (the last one wins).
# synchronous_commit=on: the template's 'off' would let a crash lose the latest commits
# from WAL buffers in shared memory, and "committed rows survive" is what is measured.
HARNESS_CONF = """
synchronous_commit = on
restart_after_crash = on
log_min_messages = warning
"""


def _launcher(procs_file: str, uid: int, gid: int, score: Optional[int]) -> Callable[[], None]:
    """preexec_fn: join the cgroup (as root), then what every test cluster does (take the
    launcher's score, drop to the PostgreSQL user). Everything exec'd from here on lives
    and is charged in the group."""
    then = demote(uid, gid, score)

    def run() -> None:
        enter(procs_file)
        then()

    return run


class HarnessCluster(Cluster):
    """A Cluster whose postmaster (via `start` or `pg_ctl`) starts inside `procs_file`'s
    cgroup. Data directories are /pgdata/oomh-*: outside pgoom's default pattern, so a
    watcher someone else runs on the same host cannot protect the baseline by accident."""

    def __init__(self, template: Template, procs_file: str, **kw: object) -> None:
        self.procs_file = procs_file
        kw.setdefault("name", f"oomh-{os.urandom(4).hex()}")
        try:
            super().__init__(template, **kw)  # type: ignore[arg-type]
            with open(f"{self.data_dir}/postgresql.conf", "a") as conf:
                conf.write(HARNESS_CONF)
        except BaseException:
            # Interrupted while copying the template: nobody else knows these paths yet.
            for path in (getattr(self, "data_dir", None), getattr(self, "socket_dir", None)):
                if path:
                    shutil.rmtree(path, ignore_errors=True)
            raise

    def _preexec(self) -> Callable[[], None]:
        return _launcher(self.procs_file, self.template.uid, self.template.gid, self.launcher_score)

    @property
    def pattern(self) -> str:
        """A --pattern for pgoom that names this cluster's postmaster and nothing else."""
        return rf"postgres -D {self.data_dir}(\s|$)"

    def try_connect(self, timeout_s: float = 5.0) -> tuple[bool, str]:
        """One real connection and query: (ok, error text)."""
        try:
            done = subprocess.run(
                self.psql_argv("-c", "select 1"),
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False, "timed out"
        ok = done.returncode == 0 and done.stdout.strip() == "1"
        if ok:
            return True, ""
        # 'psql: error: connection to server on socket "/tmp/.../.s.PGSQL.5432" failed: No
        # such file or directory': keep what failed, drop the path.
        first = (done.stderr.strip().splitlines() or ["?"])[0]
        return False, re.sub(r'socket "[^"]*"', "socket", first.removeprefix("psql: error: "))

    def wait_connectable(self, timeout_s: float, interval_s: float = 0.01) -> Optional[float]:
        """Seconds until a connection succeeds, or None after `timeout_s`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.try_connect(min(5.0, timeout_s))[0]:
                return time.monotonic() - start
            time.sleep(interval_s)
        return None

    def kill_leftovers(self, pids: list[int], timeout_s: float = 10.0) -> list[int]:
        """After the postmaster died: wait for its orphans to notice and exit, then SIGKILL
        the stragglers (our own processes, by PID). Returns the PIDs that had to be killed."""
        postgres = [p for p in pids if alive(p)]
        killed: list[int] = []
        try:
            wait_for(lambda: not any(alive(p) for p in postgres), timeout_s, 0.05)
        except TimeoutError:
            killed = [p for p in postgres if alive(p)]
            for pid in killed:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            wait_for(lambda: not any(alive(p) for p in killed), 10, 0.05)
        for pid in postgres:
            reap(pid)
        return killed

    def wait_postmaster_gone(self, pid: int, timeout_s: float = 30.0) -> None:
        """Until the PID is gone from /proc, not merely a zombie: a new postmaster refuses
        to start while kill(old, 0) still succeeds, and a zombie answers it."""
        if self.proc is not None and self.proc.pid == pid:
            self.proc.wait(timeout=timeout_s)
            return

        def gone() -> bool:
            reap(pid)
            return not os.path.exists(f"/proc/{pid}")

        wait_for(gone, timeout_s, 0.01, what=f"postmaster {pid} to be reaped")

    def descendants(self, pid: int) -> list[int]:
        return children_of(pid)


def become_subreaper() -> bool:
    """Adopt orphaned descendants (a postmaster pg_ctl started, a dead postmaster's
    children) so the harness can reap them itself: on some hosts PID 1 leaves zombies for
    seconds, and a zombie postmaster blocks the next start ("lock file already exists")."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_child_subreaper = 36
        return bool(libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def reap(pid: int) -> None:
    """Collect `pid` if it is our (adopted) zombie child; anything else is left alone."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


@dataclass
class SessionOutcome:
    ok: bool
    lines: list[str]


class Session:
    """A psql process over the unix socket, fed statements on stdin; `run` waits for a
    marker line so each statement's completion is known without a fixed sleep."""

    def __init__(self, cluster: Cluster) -> None:
        self.proc = subprocess.Popen(
            cluster.psql_argv("-v", "ON_ERROR_STOP=0"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            bufsize=0,
        )
        self._selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)
        self._buffer = ""
        self._count = 0

    def run(self, sql: str, timeout_s: float = 60.0) -> SessionOutcome:
        self._count += 1
        marker = f"pgoom-harness-done-{self._count}"
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(f"{sql}\n\\echo {marker}\n".encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return SessionOutcome(False, ["psql is gone"])
        lines: list[str] = []
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while time.monotonic() < deadline:
            if not self._selector.select(timeout=max(0.0, deadline - time.monotonic())):
                continue
            chunk = os.read(fd, 65536).decode("utf-8", "replace")
            if not chunk:
                return SessionOutcome(False, [*lines, self._buffer])  # psql exited
            self._buffer += chunk
            while "\n" in self._buffer:
                line, self._buffer = self._buffer.split("\n", 1)
                if line == marker:
                    failed = any(
                        word in text
                        for text in lines
                        for word in ("ERROR", "FATAL", "server closed", "connection to server")
                    )
                    return SessionOutcome(not failed, lines)
                lines.append(line)
        return SessionOutcome(False, [*lines, "timed out"])

    def close(self, timeout_s: float = 5.0) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._selector.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
