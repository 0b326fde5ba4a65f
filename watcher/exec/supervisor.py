"""The monitor of `pgoom exec`: `pgoom watch` in its own process, under a small supervisor
that restarts it with backoff and ends with the main process.

Process layout (P = the `pgoom exec` process, which then execs CMD and keeps its PID):

    P --fork--> A (setsid) --fork--> B (supervisor) --fork+exec--> M (`pgoom watch`)

A exits at once and P reaps it before exec, so P (and so CMD) never has a child of ours
when it starts. B is orphaned and reparented: in a container where P is PID 1 that is CMD
itself, which may never reap (postgres, sleep, a shell script) -- and a postmaster that
reaps an unknown child with a non-zero status even starts crash recovery. Hence B never
exits while P lives: it ignores SIGTERM/SIGINT/SIGHUP (only the end of P ends it; where P is
PID 1 the kernel kills everything with it). B reaps M, so M never becomes anyone's zombie.
B watches P through a pidfd (Linux 5.3+; polling /proc/<pid>/stat with its start time
before that) and, when P is gone, stops M (SIGTERM, SIGKILL after 5 s) and exits. M gets
PR_SET_PDEATHSIG so that it ends if B is killed. A lock on a file in /tmp (held by B)
keeps a second `pgoom exec` in the same container -- the patroni shim run by hand, say --
from starting a second monitor.

Standard library only until B runs: P imports this module on the database's start path.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

from watcher.exec.privileges import (
    MONITOR_CAPS,
    TYPE_CHECKING,
    PrivilegeError,
    describe_caps,
    keep_only,
    set_parent_death_signal,
    set_process_name,
)
from watcher.limits import EXIT_USAGE  # a configuration error: restarting cannot help

if TYPE_CHECKING:  # no typing import on the start path (see watcher.exec.privileges)
    from typing import Optional

LOCK_ENV = "PGOOM_MONITOR_LOCK"
DEFAULT_LOCK = "/tmp/pgoom-monitor.lock"
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
HEALTHY_AFTER_S = 60.0  # a monitor that ran this long restarts at the first backoff again
STOP_GRACE_S = 5.0
POLL_S = 1.0  # without pidfds


class AlreadyRunning(Exception):
    pass


def say(message: str) -> None:
    try:
        sys.stderr.write(f"pgoom: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # stderr closed: nothing else to tell


def monitor_argv(args: list[str]) -> list[str]:
    """`pgoom watch ARGS` on the interpreter running us. -I: PYTHONPATH and user site of the
    container (set for Patroni, say) must not change what pgoom imports; the directory that
    holds the watcher package goes first instead (the image's isolated /opt/pgoom/lib, or
    the source tree)."""
    import watcher

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(watcher.__file__)))
    boot = (
        f"import sys; sys.path.insert(0, {package_root!r}); from watcher.main import main; main()"
    )
    return [sys.executable, "-I", "-c", boot, *args]


def take_lock() -> int:
    path = os.environ.get(LOCK_ENV) or DEFAULT_LOCK
    import fcntl

    # O_NOFOLLOW: /tmp is world-writable; root must not follow a planted symlink.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(
            f"a monitor already runs in this container ({path} is locked)"
        ) from None
    return fd


def _pidfd(pid: int) -> Optional[int]:
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return int(opener(pid))
    except OSError:
        return None  # ENOSYS before Linux 5.3


def _start_time(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return fields[19].decode()


def launch(args: list[str]) -> None:
    """Start the supervisor and return in the calling process once it is detached."""
    try:
        lock_fd: Optional[int] = take_lock()
    except AlreadyRunning as err:
        say(f"{err}: not starting another")
        return
    except OSError as err:
        say(f"warning: cannot lock {os.environ.get(LOCK_ENV) or DEFAULT_LOCK}: {err.strerror}")
        lock_fd = None
    main_pid = os.getpid()
    main_start = _start_time(main_pid)
    main_pidfd = _pidfd(main_pid)
    argv = monitor_argv(args)
    first = os.fork()
    if first == 0:  # A
        code = 1
        try:
            os.setsid()  # out of CMD's process group: a terminal's ^C is for CMD only
            if os.fork() == 0:  # B
                _supervise(main_pid, main_start, main_pidfd, argv)
            code = 0
        finally:
            os._exit(code)
    os.waitpid(first, 0)
    for fd in (main_pidfd, lock_fd):
        if fd is not None:
            os.close(fd)  # B keeps its copies; CMD must not inherit them


# ----------------------------------------------------------------- in B, the supervisor


def _supervise(
    main_pid: int, main_start: Optional[str], main_pidfd: Optional[int], argv: list[str]
) -> None:
    code = 0
    supervisor = Supervisor(main_pid, main_start, main_pidfd, argv)
    try:
        supervisor.run()
    except BaseException as err:  # B must never unwind into P's code
        say(f"monitor supervisor failed: {err!r}; the monitor is not restarted")
        code = 1
        # Even so, B must not end before P: where P is PID 1, B is CMD's child and would be
        # left a zombie. (M, if any, ends by its parent-death signal when B does.)
        try:
            while not supervisor.main_gone():
                supervisor.wait_main(POLL_S)
        except BaseException:
            pass
    finally:
        os._exit(code)


class Supervisor:
    def __init__(
        self, main_pid: int, main_start: Optional[str], main_pidfd: Optional[int], argv: list[str]
    ) -> None:
        self.main_pid = main_pid
        self.main_start = main_start
        self.main_pidfd = main_pidfd
        self.argv = argv
        self.child: Optional[int] = None
        self.child_pidfd: Optional[int] = None
        self.started_at = 0.0
        self.next_start = 0.0
        self.failures = 0
        self.given_up = False

    def run(self) -> None:
        self.prepare()
        while not self.main_gone():
            now = time.monotonic()
            if self.child is None and not self.given_up and now >= self.next_start:
                self.spawn()
            self.wait(self.timeout(now))
            self.reap()
        self.stop_child()

    def prepare(self) -> None:
        for signo in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signo, signal.SIG_IGN)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        try:
            set_process_name("pgoom-supervise")
        except Exception:
            pass  # only cosmetic: ps shows the parent's name
        try:
            kept = keep_only(MONITOR_CAPS)
        except (PrivilegeError, OSError) as err:
            say(f"warning: monitor capabilities: {err}")
        else:
            missing = [c for c in MONITOR_CAPS if not kept & (1 << c)]
            if missing:
                say(
                    f"monitor capabilities: {describe_caps(kept)} "
                    f"({describe_caps(sum(1 << c for c in missing))} not available here)"
                )

    def main_gone(self) -> bool:
        if self.main_pidfd is not None:
            ready, _, _ = select.select([self.main_pidfd], [], [], 0)
            return bool(ready)
        return _start_time(self.main_pid) != self.main_start

    def wait_main(self, timeout_s: float) -> None:
        if self.main_pidfd is not None:
            select.select([self.main_pidfd], [], [], timeout_s)
        else:
            time.sleep(timeout_s)

    def timeout(self, now: float) -> Optional[float]:
        if self.child is None:
            timeout = None if self.given_up else max(0.0, self.next_start - now)
        else:
            timeout = None
        if self.main_pidfd is None or (self.child is not None and self.child_pidfd is None):
            timeout = POLL_S if timeout is None else min(timeout, POLL_S)
        return timeout

    def wait(self, timeout: Optional[float]) -> None:
        fds = [fd for fd in (self.main_pidfd, self.child_pidfd) if fd is not None]
        try:
            select.select(fds, [], [], timeout)
        except InterruptedError:
            pass

    def spawn(self) -> None:
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # M
            try:
                set_parent_death_signal(signal.SIGTERM)
                if os.getppid() != supervisor:  # B died before the prctl took effect
                    os._exit(0)
                # Ignored dispositions survive exec: give M the defaults back.
                for signo in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
                    signal.signal(signo, signal.SIG_DFL)
                os.execv(self.argv[0], self.argv)
            finally:
                os._exit(127)
        self.child = pid
        self.child_pidfd = _pidfd(pid)
        self.started_at = time.monotonic()

    def reap(self) -> None:
        if self.child is None:
            return
        try:
            pid, status = os.waitpid(self.child, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.child, 0
        if pid == 0:
            return
        ran_s = time.monotonic() - self.started_at
        if self.child_pidfd is not None:
            os.close(self.child_pidfd)
        self.child, self.child_pidfd = None, None
        how = (
            f"was killed by signal {os.WTERMSIG(status)}"
            if os.WIFSIGNALED(status)
            else f"exited with status {os.waitstatus_to_exitcode(status)}"
        )
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_USAGE:
            self.given_up = True
            say(f"monitor (pid {pid}) {how}: its configuration is wrong, not restarting")
            return
        self.failures = 0 if ran_s >= HEALTHY_AFTER_S else self.failures + 1
        delay_s = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, self.failures - 1))
        self.next_start = time.monotonic() + delay_s
        say(f"monitor (pid {pid}) {how} after {ran_s:.1f} s; restarting in {delay_s:g} s")

    def stop_child(self) -> None:
        if self.child is None:
            return
        try:
            os.kill(self.child, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline:
            pid, _ = os.waitpid(self.child, os.WNOHANG)
            if pid:
                return
            left_s = max(0.0, deadline - time.monotonic())
            if self.child_pidfd is not None:
                select.select([self.child_pidfd], [], [], left_s)
            else:
                time.sleep(min(0.05, left_s))
        os.kill(self.child, signal.SIGKILL)
        os.waitpid(self.child, 0)
