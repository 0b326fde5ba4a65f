"""v1 memory.pressure_level is heard at most once per quiet interval while the usage
thresholds stay armed: watcher.guard.Guards on real eventfds and its own epoll, with a fake
clock and a fake cgroup tree whose working set is below the threshold (page cache churning
at the limit). The rate it saves is measured in docs/guard.md."""

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
    VMPRESSURE_QUIET_S,
    PressureSource,
    Quiet,
    Registration,
    V1Pressure,
    _eventfd,
)

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
    def __init__(self, tmp_path: Path, quiet_s: float = QUIET_S) -> None:
        # 260 of 300 MiB in use by private memory, the rest page cache at the limit.
        (tmp_path / "memory.usage_in_bytes").write_text(f"{299 * MIB}\n")
        (tmp_path / "memory.limit_in_bytes").write_text(f"{300 * MIB}\n")
        (tmp_path / "memory.stat").write_text(f"total_cache {39 * MIB}\ntotal_shmem 0\n")
        self.now_ns = 1_000_000_000_000
        self.sources: list[Eventfds] = []
        self.guards = Guards(
            GuardSettings(),
            open_source=self.open_source,
            clock_ns=lambda: self.now_ns,
            vmpressure_quiet_s=quiet_s,
        )
        guard = self.guards.guard(500, 1, MemoryGroup(1, str(tmp_path)))
        assert guard is not None
        self.guard: Guard = guard
        (self.source,) = self.sources

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


def test_the_default_interval_is_short_beside_the_time_to_the_limit() -> None:
    # From 90 % to the limit of 300 MiB at the harness's ~175 MB/s takes ~180 ms: the quiet
    # interval, the longest vmpressure alone can be unheard, must leave most of it.
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
