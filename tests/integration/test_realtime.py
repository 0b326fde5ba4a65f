"""--realtime: the watcher runs at SCHED_FIFO when the kernel allows it, and without
CAP_SYS_NICE it says so once and keeps protecting at normal priority."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.support.watcher import Watcher

pytestmark = pytest.mark.root


def test_realtime_runs_at_sched_fifo() -> None:
    watcher = Watcher("--source", "netlink", "--pattern", "pgoom-rt-nothing", "--realtime")
    try:
        watcher.wait_ready()
        assert "running at SCHED_FIFO priority 1 (--realtime)" in watcher.text()
        assert os.sched_getscheduler(watcher.proc.pid) == os.SCHED_FIFO
        assert os.sched_getparam(watcher.proc.pid).sched_priority == 1
    finally:
        assert watcher.stop() == 0


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_without_cap_sys_nice_it_warns_and_keeps_going() -> None:
    drop = ["setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice", "--"]
    watcher = Watcher(
        "--source", "netlink", "--pattern", "pgoom-rt-nothing", "--realtime", prefix=drop
    )
    try:
        text = watcher.wait_ready()
        assert "--realtime: SCHED_FIFO refused (Operation not permitted)" in text
        assert os.sched_getscheduler(watcher.proc.pid) == os.SCHED_OTHER
    finally:
        assert watcher.stop() == 0
