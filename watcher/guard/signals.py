"""The guard's only act: send SIGINT or SIGTERM to one backend, after re-checking that the
PID still names the process that was chosen.

The check and the signal go through a pidfd: once the pidfd is open it names that one
process for good, so checking the start time *after* opening it leaves no window in which
the PID could be reused between the check and the signal. Where pidfds are missing (kernel
before 5.3), the re-check is followed by kill(): a window of microseconds.

SIGKILL is not in this module's vocabulary: a backend killed by a signal other than SIGINT
or SIGTERM is exactly the crash restart the guard exists to prevent.
"""

from __future__ import annotations

import enum
import os
import signal

from watcher.errors import AccessDenied, ProcessGone
from watcher.procfs import ProcFS


class Sent(enum.Enum):
    SENT = "sent"
    GONE = "gone"  # exited, or the PID now names another process
    DENIED = "denied"  # no CAP_KILL and another uid


ALLOWED = frozenset({signal.SIGINT, signal.SIGTERM})


def send(procfs: ProcFS, pid: int, start_ticks: int, signum: signal.Signals) -> Sent:
    if signum not in ALLOWED:
        raise ValueError(f"the guard sends SIGINT or SIGTERM only, not {signum.name}")
    pidfd = -1
    try:
        if hasattr(os, "pidfd_open") and procfs.root == "/proc":
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                return Sent.GONE
            except OSError:
                pidfd = -1  # ENOSYS in an old kernel or a seccomp profile: fall back
        try:
            stat = procfs.stat(pid)
        except ProcessGone:
            return Sent.GONE
        except AccessDenied:
            return Sent.DENIED
        if stat.starttime_ticks != start_ticks or stat.state in ("Z", "X"):
            return Sent.GONE
        try:
            if pidfd >= 0:
                signal.pidfd_send_signal(pidfd, signum)
            else:
                os.kill(pid, signum)
        except ProcessLookupError:
            return Sent.GONE
        except PermissionError:
            return Sent.DENIED
        return Sent.SENT
    finally:
        if pidfd >= 0:
            os.close(pidfd)
