"""Read what the guard needs about a postmaster's children, through watcher.procfs."""

from __future__ import annotations

from watcher.errors import AccessDenied, ProcessGone
from watcher.guard.victim import Child
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
