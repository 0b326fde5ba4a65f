"""v1 memory.pressure_level is heard at most once per quiet interval after a reading below
the threshold (shorter the closer the working set is to it), while the usage thresholds stay
armed: watcher.guard.Guards on real eventfds and its own epoll, with a fake clock and a fake
cgroup tree (usage at the limit, page cache churning under it). The rate it saves is
measured in docs/guard.md."""

from __future__ import annotations

import math
import os
import select
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from watcher.guard import Guards, GuardSettings
from watcher.guard.episode import Guard
from watcher.guard.memory import MemoryGroup
from watcher.guard.pressure import (
    FASTEST_GROWTH_BYTES_PER_S,
    VMPRESSURE_QUIET_S,
    PressureSource,
    Quiet,
    Registration,
    V1Pressure,
    _eventfd,
    quiet_for_s,
)
from watcher.procfs import ProcFS

MIB = 1 << 20
QUIET_S = 0.05


class Eventfds(V1Pressure):
    """V1Pressure's registrations and drain, on plain eventfds the test notifies itself."""

    def __init__(self, quiet_s: float) -> None:
        PressureSource.__init__(self)
        self.registrations = [
            Registration(_eventfd(), select.EPOLLIN, "threshold"),
            Registration(_eventfd(), select.EPOLLIN, "vmpressure", quiet_s),
        ]
        self.by_signal = {r.signal: r.fd for r in self.registrations}

    def notify(self, signal: str, times: int = 1) -> None:
        for _ in range(times):
            os.write(self.by_signal[signal], (1).to_bytes(8, "little"))


class Setup:
    def __init__(self, tmp_path: Path, quiet_s: float = QUIET_S, ws_mib: int = 100) -> None:
        self.tmp_path = tmp_path
        self.set_working_set(ws_mib)
        (tmp_path / "memory.limit_in_bytes").write_text(f"{300 * MIB}\n")
        self.now_ns = 1_000_000_000_000
        self.sources: list[Eventfds] = []
        (tmp_path / "proc").mkdir()
        self.guards = Guards(
            # An empty /proc: the fake postmaster has no children, nobody can be signalled.
            GuardSettings(dry_run=True),
            ProcFS(str(tmp_path / "proc")),
            open_source=self.open_source,
            clock_ns=lambda: self.now_ns,
            vmpressure_quiet_s=quiet_s,
        )
        guard = self.guards.guard(500, 1, MemoryGroup(1, str(tmp_path)))
        assert guard is not None
        self.guard: Guard = guard
        (self.source,) = self.sources

    def set_working_set(self, ws_mib: int) -> None:
        """Usage at the limit (299 of 300 MiB), the rest of it page cache."""
        (self.tmp_path / "memory.usage_in_bytes").write_text(f"{299 * MIB}\n")
        cache = f"total_cache {(299 - ws_mib) * MIB}\ntotal_shmem 0\n"
        (self.tmp_path / "memory.stat").write_text(cache)

    def open_source(self, group: MemoryGroup, *args: Any) -> PressureSource:
        *_, quiet_s = args
        self.sources.append(Eventfds(quiet_s))
        return self.sources[-1]

    def woken(self) -> bool:
        """Whether the loop holding the guard's one fd would wake up now."""
        return bool(select.select([self.guards.fileno()], [], [], 0)[0])

    def taken(self, signal: str) -> int:
        return self.guard.counters.pressure_events.get(signal, 0)

    def advance_to_deadline(self) -> None:
        deadline = self.guards.deadline_s()
        assert deadline is not None
        self.now_ns = max(self.now_ns, math.ceil(deadline * 1e9))
        self.guards.on_timer(self.now_ns / 1e9)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    yield s
    s.guards.close()


def test_vmpressure_is_heard_once_per_quiet_interval(setup: Setup) -> None:
    assert setup.guards.deadline_s() is None  # armed, no timer
    setup.source.notify("vmpressure")
    assert setup.woken()
    setup.guards.on_ready()
    assert setup.taken("vmpressure") == 1  # the first one at once
    assert setup.guards.deadline_s() == pytest.approx(setup.now_ns / 1e9 + QUIET_S)
    # Reclaim goes on: 10 more notifications within the interval wake nobody...
    setup.now_ns += int(QUIET_S / 2 * 1e9)
    setup.source.notify("vmpressure", 10)
    assert not setup.woken()
    assert setup.taken("vmpressure") == 1
    # ...and are taken as one when it ends; then quiet again.
    setup.advance_to_deadline()
    assert setup.taken("vmpressure") == 2
    assert setup.guards.deadline_s() == pytest.approx(setup.now_ns / 1e9 + QUIET_S)
    # Reclaim stopped: the end of the interval finds nothing and listening resumes, with no
    # timer left (idle costs no wakeup).
    setup.advance_to_deadline()
    assert setup.taken("vmpressure") == 2
    assert setup.guards.deadline_s() is None
    assert not setup.woken()
    setup.source.notify("vmpressure")
    assert setup.woken()
    setup.guards.on_ready()
    assert setup.taken("vmpressure") == 3


def test_usage_thresholds_are_heard_at_once_while_vmpressure_is_quiet(setup: Setup) -> None:
    setup.source.notify("vmpressure")
    setup.guards.on_ready()
    setup.source.notify("vmpressure", 5)
    for taken in (1, 2, 3):
        setup.source.notify("threshold")
        assert setup.woken()
        setup.guards.on_ready()
        assert setup.taken("threshold") == taken
    assert setup.taken("vmpressure") == 1
    assert not setup.woken()


def test_a_forgotten_postmaster_leaves_no_timer(setup: Setup) -> None:
    setup.source.notify("vmpressure")
    setup.guards.on_ready()
    assert setup.guards.deadline_s() is not None
    setup.guards.forget(500)
    assert setup.guards.deadline_s() is None


def test_the_closer_to_the_threshold_the_shorter_the_quiet(tmp_path: Path) -> None:
    # Threshold 270 MiB (90 % of 300). At 260 MiB, 10 MiB of headroom: quiet for the time the
    # fastest growth needs for it. At the threshold: every wakeup is taken.
    s = Setup(tmp_path, ws_mib=260)
    try:
        s.source.notify("vmpressure")
        s.guards.on_ready()
        quiet = (s.guards.deadline_s() or 0) - s.now_ns / 1e9
        assert quiet == pytest.approx(10 * MIB / FASTEST_GROWTH_BYTES_PER_S)
        assert 0 < quiet < QUIET_S
        s.set_working_set(255)  # reclaim went on; the next reading is further from it
        s.source.notify("vmpressure")
        s.advance_to_deadline()
        assert s.taken("vmpressure") == 2
        s.set_working_set(270)
        s.source.notify("vmpressure")
        s.advance_to_deadline()
        assert s.taken("vmpressure") == 3
        assert s.guards.deadline_s() is None  # nothing hushed (no victim in the fake tree)
        for taken in (4, 5):
            s.source.notify("vmpressure")
            assert s.woken()
            s.guards.on_ready()
            assert s.taken("vmpressure") == taken
    finally:
        s.guards.close()


def test_quiet_is_the_headroom_at_the_fastest_growth() -> None:
    assert quiet_for_s(260 * MIB, 270 * MIB, 0.05) == pytest.approx(
        10 * MIB / FASTEST_GROWTH_BYTES_PER_S
    )
    assert quiet_for_s(10 * MIB, 270 * MIB, 0.05) == 0.05  # far below: the longest
    assert quiet_for_s(270 * MIB, 270 * MIB, 0.05) == 0.0
    assert quiet_for_s(280 * MIB, 270 * MIB, 0.05) == 0.0
    assert quiet_for_s(10 * MIB, 270 * MIB, 0.0) == 0.0


def test_quiet_zero_takes_every_wakeup(tmp_path: Path) -> None:
    s = Setup(tmp_path, quiet_s=0.0)
    try:
        for taken in (1, 2, 3):
            s.source.notify("vmpressure")
            assert s.woken()
            s.guards.on_ready()
            assert s.taken("vmpressure") == taken
            assert s.guards.deadline_s() is None
    finally:
        s.guards.close()


def test_the_longest_quiet_is_short_beside_the_time_to_the_limit() -> None:
    # From 90 % to the limit of 300 MiB at the fastest growth measured (500 MB/s) takes
    # ~60 ms; far below the threshold the quiet may be longer than near it, but not seconds.
    assert 0 < VMPRESSURE_QUIET_S <= 0.1


def test_quiet_keeps_the_earliest_deadline_and_releases_what_is_due() -> None:
    quiet = Quiet()
    assert quiet.deadline_s() is None
    quiet.hush(3, 10.0, 0.05)
    quiet.hush(4, 10.01, 0.05)
    assert quiet.deadline_s() == pytest.approx(10.05)
    assert quiet.due(10.049) == []
    assert quiet.due(10.05) == [3]
    assert quiet.deadline_s() == pytest.approx(10.06)
    quiet.forget(4)
    assert quiet.deadline_s() is None
