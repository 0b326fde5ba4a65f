"""Read what the guard needs about a postmaster's children, and about the other processes of
its memory group, through watcher.procfs."""

from __future__ import annotations

from typing import Optional

from watcher.errors import AccessDenied, ProcessGone
from watcher.guard.victim import Child, Member
from watcher.parse import status_fields
from watcher.procfs import ProcFS

_KIB = 1024


def _kib(fields: dict[str, str], key: str) -> int:
    value = fields.get(key, "0 kB").split()
    return int(value[0]) * _KIB if value and value[0].isdigit() else 0


def read_children(procfs: ProcFS, postmaster_pid: int) -> list[Child]:
    """The postmaster's live children with their titles and memory. A child that exits while
    it is read is skipped: that is normal, not an error."""
    try:
        pids = procfs.children(postmaster_pid)
    except (ProcessGone, AccessDenied):
        return []
    children: list[Child] = []
    for pid in pids:
        try:
            stat = procfs.stat(pid)
            if stat.ppid != postmaster_pid or stat.state in ("Z", "X"):
                continue
            argv = procfs.cmdline(pid)
            fields = status_fields(procfs.read_text(pid, "status"), "RssAnon", "RssShmem", "VmSwap")
        except (ProcessGone, AccessDenied):
            continue
        children.append(
            Child(
                pid=pid,
                start_ticks=stat.starttime_ticks,
                argv=argv,
                rss_anon_bytes=_kib(fields, "RssAnon"),
                swap_bytes=_kib(fields, "VmSwap"),
                rss_shmem_bytes=_kib(fields, "RssShmem"),
            )
        )
    return children


_SIGKILL_BIT = 1 << (9 - 1)  # /proc/<pid>/status SigPnd/ShdPnd: bit N-1 is signal N


def _sigkill_pending(fields: dict[str, str]) -> bool:
    for key in ("ShdPnd", "SigPnd"):
        try:
            if int(fields.get(key, "0"), 16) & _SIGKILL_BIT:
                return True
        except ValueError:
            continue
    return False


def read_members(procfs: ProcFS, pids: list[int], in_cgroup: bool = True) -> list[Member]:
    """What the kernel's OOM killer would weigh for each of `pids` (watcher.guard.victim.
    kernel_choice). A task without a memory map is a kernel thread on the host; in a cgroup
    (where no kernel thread lives) it is a process exiting, whose memory is on its way back;
    so is a process listed a moment ago and gone when read."""
    members: list[Member] = []
    for pid in pids:
        try:
            fields = status_fields(
                procfs.read_text(pid, "status"),
                "State", "VmRSS", "VmSwap", "VmPTE", "ShdPnd", "SigPnd", "Kthread",
            )  # fmt: skip
            state = fields.get("State", "")[:1]
            if "VmRSS" not in fields and (not in_cgroup or fields.get("Kthread") == "1"):
                continue
            adj = procfs.oom_score_adj(pid) if state not in ("Z", "X") else 0
        except ProcessGone:
            # Listed in the group a moment ago and gone now: it exited while the group was
            # read, and what it held is coming back (or was killed: the same).
            members.append(Member(pid, 0, 0, 0, 0, dying=True))
            continue
        except (AccessDenied, ValueError):
            continue
        dying = "VmRSS" not in fields or state in ("Z", "X") or _sigkill_pending(fields)
        members.append(
            Member(
                pid,
                _kib(fields, "VmRSS"),
                _kib(fields, "VmSwap"),
                _kib(fields, "VmPTE"),
                adj,
                dying=dying,
            )
        )
    return members


def read_private(procfs: ProcFS, pid: int, start_ticks: int) -> Optional[int]:
    """One backend's private memory now (RssAnon + swap); None once it has exited (or its
    PID belongs to another process)."""
    try:
        stat = procfs.stat(pid)
        if stat.starttime_ticks != start_ticks or stat.state in ("Z", "X"):
            return None
        fields = status_fields(procfs.read_text(pid, "status"), "RssAnon", "VmSwap")
    except (ProcessGone, AccessDenied):
        return None
    if "RssAnon" not in fields:
        return None  # a zombie's mm is gone: so is its memory
    return _kib(fields, "RssAnon") + _kib(fields, "VmSwap")
