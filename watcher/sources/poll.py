"""The last resort: list /proc every interval and examine only PIDs not seen last time.

A PID is looked at on the tick it appears and once more on the next: a tick that lands
between fork and exec (pg_ctl's `sh -c "exec postgres ..."`, a launcher that drops
privileges first) sees the launcher, and the second look sees postgres. A PID that exits
and is reused within one interval is not re-examined; the engine's verify tick rescans
everything in this mode, which bounds that gap.
"""

from __future__ import annotations

from typing import Optional

from watcher.procfs import ProcFS
from watcher.sources.base import Event, Examine


class PollSource:
    name = "poll"
    reports_forks = False

    def __init__(self, interval_s: float, proc_root: str = "/proc") -> None:
        self.interval_s = interval_s
        self.procfs = ProcFS(proc_root)
        self._seen: set[int] = set()
        self._young: set[int] = set()  # new on the previous tick: one more look
        self._scans = 0

    def open(self) -> None:
        self._seen = set(self.procfs.pids())  # the engine's start-up scan covers these

    def fileno(self) -> Optional[int]:
        return None

    def timeout_s(self) -> Optional[float]:
        return self.interval_s

    def read(self) -> list[Event]:
        self._scans += 1
        now = set(self.procfs.pids())
        new = now - self._seen
        again = self._young & now
        self._seen = now
        self._young = new
        return [Examine(pid) for pid in sorted(new | again)]

    def add_data_dir(self, path: str) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {"scans": self._scans}

    def close(self) -> None:
        pass
