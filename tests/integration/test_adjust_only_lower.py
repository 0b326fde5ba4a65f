"""Postmaster protection only ever lowers: a process already below the target keeps its
score (a Guaranteed pod's -997 must not become -900). Positive offsets on this machine."""

from __future__ import annotations

import pytest

from tests.support.pg import read_score
from watcher.adjust import Adjuster, Outcome
from watcher.procfs import ProcFS

pytestmark = pytest.mark.root


def test_only_lower_leaves_a_lower_score_alone(sleeper: int) -> None:
    procfs = ProcFS()
    start = procfs.stat(sleeper).starttime_ticks
    assert read_score(sleeper) == 0
    result = Adjuster(procfs).set_score(sleeper, start, 500, only_lower=True)
    assert result.outcome is Outcome.UNCHANGED
    assert read_score(sleeper) == 0


def test_only_lower_still_lowers_and_exact_mode_sets(sleeper: int) -> None:
    procfs = ProcFS()
    start = procfs.stat(sleeper).starttime_ticks
    assert Adjuster(procfs).set_score(sleeper, start, 700).outcome is Outcome.ADJUSTED
    assert read_score(sleeper) == 700
    result = Adjuster(procfs).set_score(sleeper, start, 300, only_lower=True)
    assert (result.outcome, result.old, result.new) == (Outcome.ADJUSTED, 700, 300)
    assert read_score(sleeper) == 300


def test_a_reused_pid_is_never_written(sleeper: int) -> None:
    procfs = ProcFS()
    start = procfs.stat(sleeper).starttime_ticks
    result = Adjuster(procfs).set_score(sleeper, start + 1, 900)
    assert result.outcome is Outcome.GONE
    assert read_score(sleeper) == 0
