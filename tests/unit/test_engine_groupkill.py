"""The engine applying the group-kill policy, on a fake /proc and a fake cgroup v2 tree: the
captured postmaster in a container cgroup with memory.oom.group=1 (what kubelet writes).
The kernel's side (the group kill itself) is proven in the VM."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pytest

from tests.unit.fakeproc import FakeProc, pidfile_text
from watcher.config import make_settings
from watcher.engine import Engine
from watcher.procfs import ProcFS
from watcher.sources.base import Event, Forked

CONTAINER = "/kubepods.slice/kubepods-burstable.slice/pod1/cri-containerd-db.scope"
MOUNTINFO = "30 22 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
ME = os.getuid()


class KernelLikeProcFS(ProcFS):
    """The kernel replaces a score on write; a regular file in a fake tree would keep the
    tail of a longer old value ('0' over '-1000' reads 1000): truncate, as the kernel's
    value semantics are."""

    def write_oom_score_adj(self, pid: int, value: int) -> None:
        with open(self.path(pid, "oom_score_adj"), "w") as f:
            f.write(str(value))


class NoSource:
    name = "test"
    reports_forks = True

    def open(self) -> None:
        pass

    def fileno(self) -> Optional[int]:
        return None

    def timeout_s(self) -> Optional[float]:
        return None

    def read(self) -> list[Event]:
        return []

    def add_data_dir(self, path: str) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


def _setup(
    tmp_path: Path, flag: str, policy: str, score: int = -900
) -> tuple[Engine, int, Path, FakeProc]:
    tree = FakeProc(tmp_path)
    pm = tree.install("postmaster", uid=ME)
    assert pm.data_dir is not None
    tree.data_dir(pm.data_dir, pidfile=pidfile_text(pm.pid, pm.data_dir))
    (tree.proc / "self").mkdir()
    (tree.proc / "self" / "mountinfo").write_text(MOUNTINFO)
    (tree.proc / str(pm.pid) / "cgroup").write_text(f"0::{CONTAINER}\n")
    cgroup = tmp_path / "cg" / "sys/fs/cgroup" / CONTAINER.lstrip("/")
    cgroup.mkdir(parents=True)
    (cgroup / "memory.oom.group").write_text(flag)
    (cgroup / "memory.max").write_text("314572800\n")
    settings = make_settings(
        patterns=[],
        score=score,
        match_all=True,
        group_kill=policy,
        proc_root=str(tree.proc),
        cgroup_root=str(tmp_path / "cg"),
        log_file=None,
    )
    engine = Engine(settings, NoSource(), KernelLikeProcFS(str(tree.proc)))
    return engine, pm.pid, cgroup, tree


def _child_at_minus_1000(tree: FakeProc, pm: int) -> int:
    """A backend just forked: it inherited the postmaster's -1000."""
    child = tree.install("backend", uid=ME, ppid=pm)
    (tree.proc / str(child.pid) / "oom_score_adj").write_text("-1000\n")
    return child.pid


def _score(engine: Engine, pid: int) -> int:
    return engine.procfs.oom_score_adj(pid)


def test_auto_writes_minus_1000_and_children_take_the_exported_value(tmp_path: Path) -> None:
    engine, pm, _, tree = _setup(tmp_path, "1\n", "auto")
    engine.scan("test")
    assert _score(engine, pm) == -1000
    known = engine.protected[pm]
    # The captured postmaster (a test cluster) exported PG_OOM_ADJUST_VALUE=1000.
    assert known.target == -1000 and known.children_score == 1000
    assert known.survives_group_kill is True
    # A child forked at the postmaster's -1000 is moved off it at its fork event.
    child = _child_at_minus_1000(tree, pm)
    engine.handle([Forked(pm, child)])
    assert _score(engine, child) == 1000


def test_verify_tick_moves_a_child_left_at_minus_1000(tmp_path: Path) -> None:
    engine, pm, _, tree = _setup(tmp_path, "1\n", "auto")
    engine.scan("test")
    child = _child_at_minus_1000(tree, pm)
    engine.repair_drift()
    assert _score(engine, child) == 1000
    assert engine.counters.children_off_minus_1000 == 1


def test_ungroup_clears_the_flag_and_keeps_the_score(tmp_path: Path) -> None:
    engine, pm, cgroup, _ = _setup(tmp_path, "1\n", "ungroup")
    engine.scan("test")
    assert _score(engine, pm) == -900
    assert (cgroup / "memory.oom.group").read_text().strip() == "0"
    assert engine.protected[pm].survives_group_kill is True


def test_keep_changes_nothing_and_does_not_survive(tmp_path: Path) -> None:
    engine, pm, cgroup, _ = _setup(tmp_path, "1\n", "keep")
    engine.scan("test")
    assert _score(engine, pm) == -900
    assert (cgroup / "memory.oom.group").read_text() == "1\n"
    assert engine.protected[pm].survives_group_kill is False


@pytest.mark.parametrize("policy", ["auto", "ungroup", "keep"])
def test_no_group_kill_keeps_the_configured_score(tmp_path: Path, policy: str) -> None:
    engine, pm, cgroup, _ = _setup(tmp_path, "0\n", policy)
    engine.scan("test")
    assert _score(engine, pm) == -900
    assert (cgroup / "memory.oom.group").read_text() == "0\n"
    assert engine.protected[pm].children_score is None
