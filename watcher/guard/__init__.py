"""pgoom guard: cancel the runaway query before the kernel's OOM killer kills its backend
(and with it, through PostgreSQL's crash restart, every other session).

`Guards` is what an event loop holds: one epoll file descriptor (pollable for reading) that
stands for every pressure notification of every guarded postmaster, one deadline (None
while memory is fine: no timer at all), and two calls, on_ready() and on_timer(). The loop
registers that single fd in its own selector; the guard's PSI and kernfs files need EPOLLPRI,
which selectors cannot ask for, so they live in the guard's own epoll.

- memory.py   reading a group's usage, working set and limit (pure parsers + thin reader)
- pressure.py the kernel's notifications per cgroup version, as fds (and how long one that
              fires on every reclaim pass, v1's memory.pressure_level, need not be heard)
- victim.py   which child may be stopped, and which one is (pure)
- children.py reading the postmaster's children
- signals.py  SIGINT/SIGTERM after a (pid, start time) re-check, through a pidfd
- episode.py  one postmaster's state machine: pressure -> SIGINT -> SIGTERM -> cooldown
- locate.py   pid -> memory group
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from loguru import logger

from watcher.errors import AccessDenied, ProcessGone
from watcher.events import Adjusted, Exited, Failed, Kept, Notice
from watcher.guard.children import read_children, read_members, read_private
from watcher.guard.episode import WATCHING, Guard, GuardSettings, Report
from watcher.guard.locate import NotVisible, locate
from watcher.guard.memory import MemoryGroup, MemoryReader
from watcher.guard.pressure import (
    VMPRESSURE_QUIET_S,
    PressureSource,
    PressureUnavailable,
    Quiet,
    Registration,
    next_sample_in_s,
    open_pressure,
    quiet_for_s,
)
from watcher.guard.signals import send
from watcher.guard.state import remove_state, write_state
from watcher.procfs import ProcFS

__all__ = ["Guard", "GuardSettings", "Guards", "Totals"]


@dataclass
class _Entry:
    pid: int
    start_ticks: int
    group: MemoryGroup
    source: PressureSource
    guard: Guard
    sample_due_s: Optional[float] = None  # cgroup v2: the next paced reading


@dataclass
class Totals:
    """Across every guard this process ran (a postmaster that exits keeps its counts)."""

    pressure_events: dict[str, int] = field(default_factory=dict)  # by signal
    actions: dict[tuple[str, str], int] = field(default_factory=dict)  # (signal, outcome)
    kernel_oom_events: int = 0


class Guards:
    def __init__(
        self,
        settings: GuardSettings,
        procfs: Optional[ProcFS] = None,
        report: Optional[Report] = None,
        state_dir: Optional[str] = None,
        vmpressure_quiet_s: float = VMPRESSURE_QUIET_S,
        open_source: Callable[..., PressureSource] = open_pressure,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        """`vmpressure_quiet_s` (0: every wakeup is taken; benchmarks compare), `open_source`
        and `clock_ns` are injectable for tests."""
        self.settings = settings
        self.procfs = procfs or ProcFS()
        self.totals = Totals()
        # Who else hears of pressure and actions (metrics): name, fields.
        self.reports: list[Report] = [report] if report is not None else []
        self._epoll = select.epoll()
        self._by_fd: dict[int, tuple[_Entry, Registration]] = {}
        self.entries: dict[int, _Entry] = {}
        self.state_dir = state_dir
        self._published: object = None
        self.vmpressure_quiet_s = vmpressure_quiet_s
        self._open_source = open_source
        self._clock_ns = clock_ns
        self._quiet = Quiet()

    def fileno(self) -> int:
        return self._epoll.fileno()

    def guard(
        self, pid: int, start_ticks: int, group: Optional[MemoryGroup] = None
    ) -> Optional[Guard]:
        """Start guarding postmaster `pid` (its group located unless given). Failure to watch
        is logged and leaves protection untouched: the guard is an addition, never a reason
        for pgoom (or PostgreSQL) not to run."""
        known = self.entries.get(pid)
        if known is not None:
            if known.start_ticks == start_ticks:
                return known.guard
            self.forget(pid)
        try:
            group = group or locate(self.procfs, pid)
            reader = MemoryReader(group)
            first = reader.sample()
            if first.limit_bytes is None:
                raise PressureUnavailable(f"{group.name} has no memory limit")
            source = self._open_source(
                group,
                self.settings.threshold_bytes(first.limit_bytes),
                first.limit_bytes,
                self.vmpressure_quiet_s,
            )
        except (PressureUnavailable, NotVisible, ProcessGone, AccessDenied, OSError) as err:
            logger.warning("guard: cannot guard postmaster {}: {}", pid, err)
            return None
        procfs = self.procfs
        guard = Guard(
            pid,
            group.name,
            reader.sample,
            lambda: read_children(procfs, pid),
            lambda p, s, signum: send(procfs, p, s, signum),
            self.settings,
            self._on_report,
            members=lambda: read_members(
                procfs, reader.member_pids(procfs.root), in_cgroup=group.version != 0
            ),
            private_of=lambda p, s: read_private(procfs, p, s),
            group_kill=reader.group_kill,
        )
        guard.last_sample = first
        entry = _Entry(pid, start_ticks, group, source, guard)
        self.entries[pid] = entry
        self._pace(entry)
        for registration in source.registrations:
            self._epoll.register(registration.fd, registration.mask)
            self._by_fd[registration.fd] = (entry, registration)
        logger.info(
            "guard: watching postmaster {} in {} ({}): acts at {:g}% of {:.0f} MiB{}",
            pid,
            group.name,
            source.description,
            self.settings.threshold_pct,
            first.limit_bytes / (1 << 20),
            " (dry run)" if self.settings.dry_run else "",
        )
        # Thresholds crossed before they were registered never fire: look once now.
        guard.on_pressure("start")
        return guard

    def on_notice(self, notice: Notice) -> None:
        """The engine's listener: guard what it protects, forget what exited."""
        if isinstance(notice, (Adjusted, Kept, Failed)):
            if isinstance(notice, Adjusted) and notice.method == "drift":
                return
            start = getattr(notice, "start", None)
            if start is None:
                try:
                    start = self.procfs.stat(notice.pid).starttime_ticks
                except (ProcessGone, AccessDenied):
                    return
            self.guard(notice.pid, start)
        elif isinstance(notice, Exited):
            self.forget(notice.pid)
        self.publish()

    def _on_report(self, name: str, fields: dict[str, Any]) -> None:
        totals = self.totals
        if name == "guard_pressure":
            signal = fields["signal"]
            totals.pressure_events[signal] = totals.pressure_events.get(signal, 0) + 1
            if signal == "oom":
                totals.kernel_oom_events += 1
        elif name == "guard_action":
            key = (
                fields["signal"] if fields["outcome"] != "dry_run" else "none",
                fields["outcome"],
            )
            totals.actions[key] = totals.actions.get(key, 0) + 1
        for report in self.reports:
            try:
                report(name, fields)
            except Exception as err:  # a broken metrics hook must not stop the guard
                logger.opt(exception=err).warning("guard report listener failed on {}", name)

    def forget(self, pid: int) -> None:
        entry = self.entries.pop(pid, None)
        if entry is None:
            return
        for registration in entry.source.registrations:
            self._by_fd.pop(registration.fd, None)
            self._quiet.forget(registration.fd)
            try:
                self._epoll.unregister(registration.fd)
            except OSError:
                pass
        entry.source.close()

    def publish(self) -> None:
        """The state file for `pgoom status`, when something it shows has changed."""
        if self.state_dir is None:
            return
        rows = self.status()
        key = [(r["postmaster"], r["state"], r["actions"], r["kernel_oom_events"]) for r in rows]
        if key != self._published:
            self._published = key
            write_state(rows, self.state_dir)

    def on_ready(self) -> None:
        """Dispatch every notification that is ready now."""
        received_ns = self._clock_ns()
        for fd, _events in self._epoll.poll(0):
            found = self._by_fd.get(fd)
            if found is None:
                continue
            entry, registration = found
            if entry.source.drain(registration):
                self._take(entry, registration, received_ns)
        self.publish()

    def _take(self, entry: _Entry, registration: Registration, received_ns: int) -> None:
        guard = entry.guard
        before = guard.last_sample
        guard.on_pressure(registration.signal, received_ns)
        sample = guard.last_sample
        if registration.quiet_s <= 0 or guard.state != WATCHING or sample is before:
            return  # acting, cooling down or not read: as the kernel notifies
        if sample is None or sample.limit_bytes is None:
            return
        threshold_bytes = self.settings.threshold_bytes(sample.limit_bytes)
        quiet = quiet_for_s(sample.working_set_bytes, threshold_bytes, registration.quiet_s)
        if quiet > 0:
            # Not listened to for a while: the kernel keeps counting in the eventfd, and
            # _hear() takes what came meanwhile as one wakeup.
            self._epoll.modify(registration.fd, 0)
            self._quiet.hush(registration.fd, received_ns / 1e9, quiet)

    def _hear(self, fd: int, now_ns: int) -> None:
        found = self._by_fd.get(fd)
        if found is None:
            return
        entry, registration = found
        # Listen again (nothing came: at no cost until the kernel notifies), then take what
        # came meanwhile, which may make it quiet again.
        self._epoll.modify(registration.fd, registration.mask)
        if entry.source.drain(registration):
            self._take(entry, registration, now_ns)

    def _pace(self, entry: _Entry) -> None:
        """cgroup v2 only: when to read the group next (pressure.next_sample_in_s)."""
        sample = entry.guard.last_sample
        if entry.group.version != 2 or sample is None or sample.limit_bytes is None:
            entry.sample_due_s = None
            return
        threshold = self.settings.threshold_bytes(sample.limit_bytes)
        entry.sample_due_s = self._clock_ns() / 1e9 + next_sample_in_s(
            sample.working_set_bytes, threshold
        )

    def deadline_s(self) -> Optional[float]:
        deadlines = [d for e in self.entries.values() if (d := e.guard.deadline_s()) is not None]
        deadlines += [e.sample_due_s for e in self.entries.values() if e.sample_due_s is not None]
        quiet = self._quiet.deadline_s()
        if quiet is not None:
            deadlines.append(quiet)
        return min(deadlines, default=None)

    def on_timer(self, now_s: Optional[float] = None) -> None:
        now_s = self._clock_ns() / 1e9 if now_s is None else now_s
        for fd in self._quiet.due(now_s):
            self._hear(fd, int(now_s * 1e9))
        for entry in list(self.entries.values()):
            deadline = entry.guard.deadline_s()
            if deadline is not None and now_s >= deadline:
                entry.guard.on_timer()
            due = entry.sample_due_s
            if due is not None and now_s >= due:
                entry.guard.on_sample(int(now_s * 1e9))
                self._pace(entry)
        self.publish()

    def status(self) -> list[dict[str, Any]]:
        return [entry.guard.status() for entry in self.entries.values()]

    def close(self) -> None:
        for pid in list(self.entries):
            self.forget(pid)
        self._epoll.close()
        if self.state_dir is not None:
            remove_state(self.state_dir)
