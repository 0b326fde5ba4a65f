"""cgroup v2's memory.events as the guard reads it: one change in the file wakes both of its
registrations; "events" means pressure (max, high), "oom" means the kernel's OOM killer ran.
Regular files stand in for kernfs here: only the counters' bookkeeping is tested (the real
wakeups are the VM's check "guard cgroup v2: pressure source ...")."""

from __future__ import annotations

from pathlib import Path

from watcher.guard.pressure import PsiPressure

EVENTS = "low 0\nhigh 0\nmax {max}\noom {oom}\noom_kill {kill}\noom_group_kill 0\n"


def _source(tmp_path: Path) -> tuple[PsiPressure, Path]:
    (tmp_path / "memory.pressure").write_text("")
    events = tmp_path / "memory.events"
    events.write_text(EVENTS.format(max=0, oom=0, kill=0))
    return PsiPressure(str(tmp_path / "memory.pressure"), str(events)), events


def test_memory_events_opened_as_pressure_and_oom(tmp_path: Path) -> None:
    source, _ = _source(tmp_path)
    try:
        assert [r.signal for r in source.registrations] == ["psi", "events", "oom"]
        assert (tmp_path / "memory.pressure").read_text().startswith("some 50000 1000000")
    finally:
        source.close()


def test_the_limit_reached_is_pressure_not_an_oom(tmp_path: Path) -> None:
    source, events = _source(tmp_path)
    psi, pressure, oom = source.registrations
    try:
        events.write_text(EVENTS.format(max=3, oom=0, kill=0))
        assert source.drain(pressure) == 1
        assert source.drain(oom) == 0
        assert source.drain(psi) == 1
    finally:
        source.close()


def test_a_kernel_oom_kill_is_reported_once_and_not_as_pressure(tmp_path: Path) -> None:
    source, events = _source(tmp_path)
    _, pressure, oom = source.registrations
    try:
        # The kill's wakeup also carries the `max` changes that led to it.
        events.write_text(EVENTS.format(max=9, oom=1, kill=1))
        assert source.drain(pressure) == 0
        assert source.drain(oom) == 1
        # The next change without a kill (the allocator at the limit again) is pressure.
        events.write_text(EVENTS.format(max=10, oom=1, kill=1))
        assert source.drain(pressure) == 1
        assert source.drain(oom) == 0
    finally:
        source.close()


def test_a_stall_that_came_with_a_kill_is_not_pressure(tmp_path: Path) -> None:
    source, events = _source(tmp_path)
    psi, _, oom = source.registrations
    try:
        events.write_text(EVENTS.format(max=9, oom=1, kill=1))
        assert source.drain(psi) == 0
        assert source.drain(oom) == 1
        assert source.drain(psi) == 1  # the next stall, with no new kill, is pressure
    finally:
        source.close()
