"""`pgoom status` on fake /proc trees: every verified postmaster is listed, and --pattern
decides which of them are judged against the score (it was once validated and ignored)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.fakeproc import FakeProc, pidfile_text
from watcher.commands.status import Row, snapshot
from watcher.errors import UsageError

ME = os.getuid()


@pytest.fixture
def tree(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path)


def postmaster(tree: FakeProc, name: str, adj: int) -> int:
    sample = tree.install(name, uid=ME)
    assert sample.data_dir is not None
    tree.data_dir(sample.data_dir, pidfile=pidfile_text(sample.pid, sample.data_dir))
    (tree.proc / str(sample.pid) / "oom_score_adj").write_text(f"{adj}\n")
    return sample.pid


def by_pid(rows: list[Row]) -> dict[int, Row]:
    return {row.pid: row for row in rows}


def test_without_pattern_every_postmaster_is_judged(tree: FakeProc) -> None:
    first = postmaster(tree, "postmaster", adj=-900)
    second = postmaster(tree, "named_postmaster", adj=1000)
    rows = by_pid(snapshot([], -900, tree.procfs))
    assert rows[first].role == rows[second].role == "postmaster"
    assert rows[first].protected is True
    assert rows[second].protected is False


def test_pattern_narrows_which_postmasters_are_judged(tree: FakeProc) -> None:
    covered = postmaster(tree, "postmaster", adj=-900)
    other = postmaster(tree, "named_postmaster", adj=1000)
    data_dir = by_pid(snapshot([], -900, tree.procfs))[covered].data_dir
    assert data_dir is not None
    rows = by_pid(snapshot([f"-D {data_dir}( |$)"], -900, tree.procfs))
    assert rows[covered].protected is True
    # Still a postmaster, but no --pattern names it: not judged, and the note says why.
    assert rows[other].role == "postmaster"
    assert rows[other].protected is None
    assert rows[other].note == "no --pattern covers it"


def test_a_pattern_that_names_nothing_judges_nothing(tree: FakeProc) -> None:
    pid = postmaster(tree, "postmaster", adj=1000)
    rows = by_pid(snapshot(["no-such-command"], -900, tree.procfs))
    assert rows[pid].role == "postmaster" and rows[pid].protected is None


@pytest.mark.parametrize(("patterns", "score"), [(["("], -900), ([], 1001)])
def test_bad_options_are_usage_errors(tree: FakeProc, patterns: list[str], score: int) -> None:
    with pytest.raises(UsageError):
        snapshot(patterns, score, tree.procfs)


def test_rss_comes_from_the_same_proc_root(tree: FakeProc) -> None:
    # Read through ProcFS (VmRSS of the fake tree), not psutil's global /proc: a fake PID
    # must never report the memory of whatever real process has that number.
    pid = postmaster(tree, "postmaster", adj=-900)
    assert by_pid(snapshot([], -900, tree.procfs))[pid].rss_kib == 22192
