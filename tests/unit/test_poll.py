"""PollSource on a fake /proc: new PIDs are examined on the tick they appear and once more
on the next (a tick between fork and exec sees the launcher, not postgres)."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from watcher.sources.base import Examine
from watcher.sources.poll import PollSource


@pytest.fixture
def fake_proc(tmp_path: Path) -> Path:
    for pid in (1, 2):
        (tmp_path / str(pid)).mkdir()
    (tmp_path / "self").mkdir()
    return tmp_path


def test_new_pids_are_examined_twice_then_left_alone(fake_proc: Path) -> None:
    saved = psutil.PROCFS_PATH
    try:
        source = PollSource(interval_s=1.0, proc_root=str(fake_proc))
        source.open()
        assert source.read() == []  # what open() saw is the engine's start-up scan
        (fake_proc / "40").mkdir()
        assert source.read() == [Examine(40)]
        (fake_proc / "41").mkdir()
        assert source.read() == [Examine(40), Examine(41)]
        assert source.read() == [Examine(41)]
        assert source.read() == []
        (fake_proc / "41").rmdir()
        (fake_proc / "42").mkdir()
        assert source.read() == [Examine(42)]
        (fake_proc / "42").rmdir()
        assert source.read() == []  # gone before its second look: nothing to examine
        assert source.stats()["scans"] == 7
    finally:
        psutil.PROCFS_PATH = saved
