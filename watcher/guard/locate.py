"""Which memory group a process is accounted to: its cgroup v1 memory cgroup, its cgroup v2
cgroup, or (no limit anywhere above it) the host.

Interim: watcher.memcg (the lead's pid -> cgroup module) replaces this once it lands.
"""

from __future__ import annotations

import os
from typing import Optional

from watcher.doctor import _unescape, cgroup_dir, parse_cgroup_v2_path
from watcher.guard.memory import MemoryGroup, MemoryReader
from watcher.procfs import ProcFS


def v1_memory_path(cgroup_text: str) -> Optional[str]:
    """The memory controller's path from /proc/<pid>/cgroup (`N:memory:/path`)."""
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] != "0" and "memory" in parts[1].split(","):
            return parts[2] or "/"
    return None


def mount_of(mountinfo: str, fstype: str, option: str = "") -> Optional[tuple[str, str]]:
    """(root inside the hierarchy, mount point) of the first mount of `fstype` whose super
    options include `option` (the v1 controller name)."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        if not sep or len(fields) < 5 or len(rfields) < 3 or rfields[0] != fstype:
            continue
        if option and option not in rfields[2].split(","):
            continue
        return _unescape(fields[3]), _unescape(fields[4])
    return None


def group_from(cgroup_text: str, mountinfo: str, proc_root: str) -> MemoryGroup:
    """Pure part of locate(): the group named by the two files' text."""
    v1 = v1_memory_path(cgroup_text)
    if v1 is not None:
        mount = mount_of(mountinfo, "cgroup", "memory")
        if mount is not None:
            return MemoryGroup(1, cgroup_dir(v1, *mount))
    v2 = parse_cgroup_v2_path(cgroup_text)
    mount = mount_of(mountinfo, "cgroup2")
    if v2 is not None and mount is not None:
        directory = cgroup_dir(v2, *mount)
        ancestors = []
        parent = directory
        while parent.rstrip("/") != mount[1].rstrip("/") and "/" in parent.rstrip("/"):
            parent = parent.rstrip("/").rsplit("/", 1)[0]
            ancestors.append(parent)
            if parent.rstrip("/") == mount[1].rstrip("/"):
                break
        return MemoryGroup(2, directory, tuple(ancestors))
    return MemoryGroup(0, proc_root)


def locate(procfs: ProcFS, pid: int) -> MemoryGroup:
    """The memory group of `pid`; the host when its cgroup has no memory limit (the kernel
    then OOM-kills on host memory alone, and host PSI is the signal)."""
    group = group_from(
        procfs.read_text(pid, "cgroup"), procfs.read_text("self", "mountinfo"), procfs.root
    )
    if group.version in (1, 2):
        if not os.path.isfile(
            f"{group.directory}/memory.{'usage_in_bytes' if group.version == 1 else 'current'}"
        ):
            return MemoryGroup(0, procfs.root)
        if MemoryReader(group).sample().limit_bytes is None:
            return MemoryGroup(0, procfs.root)
    return group
