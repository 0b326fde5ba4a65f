"""cgroup v2 has no usage threshold and notifies only at memory.max (measured in the VM), so
watcher.guard.Guards reads a v2 group itself, paced by the headroom: often near the
threshold, at most once a second far from it, and not at all for v1 (whose thresholds
notify). A fake v2 tree, a fake clock and a source with no fds of its own."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from watcher.guard import Guards, GuardSettings
from watcher.guard.memory import MemoryGroup
from watcher.guard.pressure import (
    FASTEST_GROWTH_BYTES_PER_S,
    V2_SAMPLE_LONGEST_S,
    V2_SAMPLE_SHORTEST_S,
    PressureSource,
    next_sample_in_s,
)
from watcher.procfs import ProcFS

MIB = 1 << 20


def test_the_pace_follows_the_headroom_within_its_bounds() -> None:
    threshold = 270 * MIB
    assert next_sample_in_s(0, threshold) == pytest.approx(270 * MIB / FASTEST_GROWTH_BYTES_PER_S)
    near = next_sample_in_s(threshold - 50 * MIB, threshold)
    assert near == pytest.approx(50 * MIB / FASTEST_GROWTH_BYTES_PER_S)
    assert next_sample_in_s(threshold - 1024, threshold) == V2_SAMPLE_SHORTEST_S
    assert next_sample_in_s(threshold + MIB, threshold) == V2_SAMPLE_LONGEST_S
    big = 8 << 30  # far from the threshold of an 8 GiB limit: once a second
    assert next_sample_in_s(MIB, big) == V2_SAMPLE_LONGEST_S


class Tree:
    def __init__(self, tmp_path: Path, version: int, limit_mib: int = 300) -> None:
        self.path = tmp_path
        self.now_ns = 1_000_000_000_000
        (tmp_path / "proc").mkdir()
        if version == 2:
            (tmp_path / "memory.max").write_text(f"{limit_mib * MIB}\n")
        else:
            (tmp_path / "memory.limit_in_bytes").write_text(f"{limit_mib * MIB}\n")
        self.set(100)
        self.guards = Guards(
            GuardSettings(dry_run=True),  # an empty /proc: nobody could be signalled
            ProcFS(str(tmp_path / "proc")),
            open_source=lambda group, *args: PressureSource(),
            clock_ns=lambda: self.now_ns,
        )
        group = MemoryGroup(version, str(tmp_path), str(tmp_path) if version == 2 else None)
        guard = self.guards.guard(500, 1, group)
        assert guard is not None
        self.guard = guard
        self.events: list[Any] = []
        self.guards.reports.append(lambda name, fields: self.events.append(fields.get("signal")))

    def set(self, ws_mib: int) -> None:
        for name in ("memory.current", "memory.usage_in_bytes"):
            (self.path / name).write_text(f"{ws_mib * MIB}\n")
        (self.path / "memory.stat").write_text("file 0\nshmem 0\ntotal_cache 0\ntotal_shmem 0\n")

    def run_until(self, seconds: float) -> int:
        """The loop: wake at each deadline until `seconds` have passed; the wakeups."""
        end_ns = self.now_ns + int(seconds * 1e9)
        wakeups = 0
        while True:
            deadline = self.guards.deadline_s()
            if deadline is None or deadline * 1e9 > end_ns:
                self.now_ns = end_ns
                return wakeups
            self.now_ns = max(self.now_ns, math.ceil(deadline * 1e9))
            self.guards.on_timer()
            wakeups += 1


def test_v2_far_from_the_threshold_is_read_by_the_headroom_and_counts_no_pressure(
    tmp_path: Path,
) -> None:
    tree = Tree(tmp_path, 2)  # 100 of 300 MiB: 170 MiB below the threshold, ~0.17 s
    expected = 10 / (170 * MIB / FASTEST_GROWTH_BYTES_PER_S)
    assert abs(tree.run_until(10) - expected) <= 2
    assert "sample" not in tree.events


def test_v2_with_a_large_limit_is_read_once_a_second(tmp_path: Path) -> None:
    tree = Tree(tmp_path, 2, limit_mib=8192)
    assert 9 <= tree.run_until(10) <= 11


def test_v2_near_the_threshold_is_read_often_and_a_crossing_is_pressure(tmp_path: Path) -> None:
    tree = Tree(tmp_path, 2)
    tree.set(265)  # 5 MiB of headroom: ~5 ms at the fastest growth, so the shortest pace
    assert tree.run_until(1) >= 50
    tree.set(275)
    tree.run_until(0.05)
    assert "sample" in tree.events  # the reading at 275 MiB was taken as pressure


def test_v1_is_not_paced_its_thresholds_notify(tmp_path: Any) -> None:
    tree = Tree(tmp_path, 1)
    assert tree.guards.deadline_s() is None
    assert tree.run_until(10) == 0
