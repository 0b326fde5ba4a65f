"""Which memory group a postmaster is accounted to, through watcher.memcg: its cgroup (v1 or
v2) where that has a limit, the host where nothing above it limits memory."""

from __future__ import annotations

from typing import Optional

from watcher.guard.memory import MemoryGroup
from watcher.memcg import CgroupView
from watcher.procfs import ProcFS


class NotVisible(RuntimeError):
    """The postmaster's memory cgroup cannot be seen from this mount namespace."""


def locate(procfs: ProcFS, pid: int, view: Optional[CgroupView] = None) -> MemoryGroup:
    """The memory group of `pid`. Raises NotVisible where its cgroup is out of sight (a
    sidecar sees only its own cgroup): guarding the host instead would watch the wrong
    limit. Raises ProcessGone / AccessDenied from /proc."""
    view = view or CgroupView(procfs)
    cgroup = view.locate(pid)
    if cgroup is None:
        return MemoryGroup(0, procfs.root)
    if cgroup.directory is None:
        raise NotVisible(
            f"the memory cgroup {cgroup.path!r} of pid {pid} is not visible here: run the "
            "guard where that cgroup is mounted (the DaemonSet, pgoom exec's monitor)"
        )
    state = view.state(cgroup)
    if state is None or state.effective_limit_bytes is None:
        return MemoryGroup(0, procfs.root)  # no limit anywhere above: the host's OOM killer
    return MemoryGroup(
        cgroup.version,
        cgroup.directory,
        state.limit_directory if cgroup.version == 2 else None,
    )
