"""Where a process's memory is accounted: its memory cgroup, as this watcher sees it.

The OOM killer that matters for PostgreSQL in a container is the memory cgroup's, not the
host's: the limit, the usage and (cgroup v2) `memory.oom.group` of the postmaster's cgroup
decide who dies and whether a score above -1000 protects anything. This module answers, for
one PID:

- which memory cgroup it is in (`/proc/<pid>/cgroup`) and on which hierarchy version: the v1
  `memory` controller where one is mounted, else the unified hierarchy;
- where that cgroup's files are in *this* mount namespace (`/proc/self/mountinfo`): the host's
  view for the DaemonSet and bare hosts, the container's view for a sidecar, where a sibling
  container's cgroup is usually not visible at all (directory None);
- what its memory looks like now: limit, usage, the working set (usage minus inactive page
  cache, the way kubelet computes it: page cache is not pressure), the nearest limit on the
  way up, and on v2 whether it kills as a group.

Parsers are pure and tested on captured lines; readers go through `read_file_text`, which
opens with O_NONBLOCK, refuses anything but a regular file and bounds the read. Paths that
come from `/proc/<pid>/cgroup` are the kernel's, but cgroup names can be chosen by whoever
may create cgroups (delegation), so a path with `..` components or control characters is
treated as not visible rather than followed.

The one cgroup write pgoom makes (memory.oom.group, for the *ungroup* policy) is here too,
beside the reads it depends on; /proc writes stay in procfs.py.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from typing import Optional

from watcher.errors import AccessDenied, ProcessGone
from watcher.procfs import ProcFS, read_file_text

# v1 reports "no limit" as PAGE_COUNTER_MAX pages: 0x7FFFFFFFFFFFF000 with 4 KiB pages; any
# value this large is no limit on any page size.
_V1_UNLIMITED_BYTES = 1 << 62
_PATH_MAX = 4096
_STAT_BYTES = 16384
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# How far _find_below looks for the levels a cgroup namespace hides: kubepods.slice /
# kubepods-<qos>.slice / kubepods-<qos>-pod<uid>.slice / the container is depth 3 at most.
_GAP_MAX_DEPTH = 4
_GAP_MAX_ENTRIES = 4096


@dataclass(frozen=True)
class CgroupLine:
    """One line of /proc/<pid>/cgroup: `hierarchy-ID:controller-list:path`."""

    hierarchy: int
    controllers: tuple[str, ...]
    path: str


@dataclass(frozen=True)
class CgroupMount:
    """A cgroup or cgroup2 mount in /proc/self/mountinfo."""

    version: int
    root: str  # the cgroup that appears at the mount point
    mount_point: str
    controllers: frozenset[str]  # v1: from the super options; v2: empty (see cgroup.controllers)


@dataclass(frozen=True)
class MemCgroup:
    """The memory cgroup of a process; directory is None where this mount namespace cannot
    see it (a sibling container's cgroup from a sidecar, a hierarchy not mounted here)."""

    version: int
    path: str
    directory: Optional[str]


@dataclass(frozen=True)
class MemoryState:
    """The memory of one cgroup at one moment. Any field the kernel did not give is None."""

    limit_bytes: Optional[int]  # the cgroup's own limit; None: no limit of its own
    effective_limit_bytes: Optional[int]  # the nearest limit on the way up (it decides the OOM)
    limit_directory: Optional[str]  # where that limit is set
    usage_bytes: Optional[int]
    inactive_file_bytes: Optional[int]
    working_set_bytes: Optional[int]
    oom_group: Optional[bool]  # v2 memory.oom.group; None on v1 (no group kill there)
    oom_kills: Optional[int]  # v2 memory.events oom_kill; v1 memory.oom_control oom_kill


@dataclass(frozen=True)
class CgroupReport:
    """A process's memory cgroup, its memory now and where a group kill would come from."""

    cgroup: Optional[MemCgroup]
    state: Optional[MemoryState]
    group_kill_at: Optional[str]  # CgroupView.highest_oom_group


# --- pure parsers ----------------------------------------------------------------------


def parse_proc_cgroup(text: str) -> list[CgroupLine]:
    lines = []
    for raw in text.splitlines():
        hier, sep1, rest = raw.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep1 and sep2) or not hier.isdigit():
            continue
        names = tuple(c for c in controllers.split(",") if c)
        lines.append(CgroupLine(int(hier), names, path or "/"))
    return lines


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def parse_cgroup_mounts(mountinfo: str) -> list[CgroupMount]:
    mounts = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        after = right.split()
        if not sep or len(fields) < 5 or len(after) < 3 or after[0] not in ("cgroup", "cgroup2"):
            continue
        version = 2 if after[0] == "cgroup2" else 1
        options = frozenset(after[2].split(",")) if version == 1 else frozenset()
        mounts.append(CgroupMount(version, _unescape(fields[3]), _unescape(fields[4]), options))
    return mounts


def memory_cgroup_line(lines: list[CgroupLine]) -> Optional[tuple[int, str]]:
    """(version, path) of the process's memory cgroup: the v1 `memory` hierarchy where the
    process is on one (a hybrid host such as this project's test machines has an empty
    unified hierarchy beside it), else the unified one."""
    for line in lines:
        if line.hierarchy != 0 and "memory" in line.controllers:
            return 1, line.path
    for line in lines:
        if line.hierarchy == 0 and not line.controllers:
            return 2, line.path
    return None


def split_cgroup_path(path: str) -> Optional[tuple[int, list[str]]]:
    """(leading '..' count, the names after them) of a cgroup path as this process's cgroup
    namespace shows it; None for anything we must not follow ('.' or '..' after a name,
    control characters, a relative or overlong path). The kernel prints a cgroup outside
    our namespace, and the root of a mount of one, as '/../../name/...'."""
    if len(path) > _PATH_MAX or _CONTROL_CHARS.search(path) or not path.startswith("/"):
        return None
    parts = [p for p in path.split("/") if p]
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    names = parts[ups:]
    if any(p in (".", "..") for p in names):
        return None
    return ups, names


def _join(mount_point: str, names: list[str]) -> str:
    base = mount_point.rstrip("/") or "/"
    if not names:
        return base
    rel = "/".join(names)
    return f"{base}/{rel}" if base != "/" else f"/{rel}"


def cgroup_dir(cgroup_path: str, mount_root: str, mount_point: str) -> Optional[str]:
    """Where cgroup `cgroup_path` appears under a mount of `mount_root` at `mount_point`,
    or None where it is outside that mount (a sibling container's cgroup seen from inside
    a cgroup namespace starts with '/..'), needs a look at the tree (unresolved_depth), or
    names something we must not follow."""
    path, root = split_cgroup_path(cgroup_path), split_cgroup_path(mount_root)
    if path is None or root is None or path[0] != root[0]:
        return None
    names, root_names = path[1], root[1]
    if names[: len(root_names)] != root_names:
        return None
    return _join(mount_point, names[len(root_names) :])


def unresolved_depth(cgroup_path: str, mount_root: str) -> Optional[tuple[int, list[str]]]:
    """A mount of a cgroup *above* our cgroup namespace (the host's cgroupfs mounted into a
    node-wide pod) shows its root as '/../../..', a process's cgroup as '/../pod/ctr': both
    relative to our namespace, whose ancestors' names are not printed. Returns (how many
    unnamed levels lie between the mount's root and the path's first name, those names),
    or None where no such gap exists or the path is not below the mount."""
    path, root = split_cgroup_path(cgroup_path), split_cgroup_path(mount_root)
    if path is None or root is None or root[1] or path[0] >= root[0]:
        return None
    return root[0] - path[0], path[1]


def parse_flat_keyed(text: str) -> dict[str, int]:
    """`key value` lines (memory.stat, memory.events, memory.oom_control); others skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            continue
    return out


def parse_limit(text: str, version: int) -> Optional[int]:
    """A limit file's value in bytes; None for no limit ('max' on v2, the v1 sentinel)."""
    value = text.strip()
    if value == "max":
        return None
    if not value.isdigit():
        return None
    number = int(value)
    if version == 1 and number >= _V1_UNLIMITED_BYTES:
        return None
    return number


def working_set(usage: Optional[int], inactive_file: Optional[int]) -> Optional[int]:
    """What the kernel cannot simply drop: usage minus inactive file pages (kubelet's
    container_memory_working_set_bytes); never below 0."""
    if usage is None:
        return None
    return max(0, usage - (inactive_file or 0))


# --- readers ---------------------------------------------------------------------------


class CgroupView:
    """The memory cgroups as this process's mount namespace shows them.

    `fs_root` prefixes every mount point, so unit tests lay out a fake cgroupfs under a
    temporary directory and a fake /proc beside it."""

    def __init__(self, procfs: ProcFS, fs_root: str = "") -> None:
        self.procfs = procfs
        self.fs_root = fs_root.rstrip("/")
        self._mounts: Optional[list[CgroupMount]] = None

    def mounts(self) -> list[CgroupMount]:
        if self._mounts is None:
            try:
                text = self.procfs.read_text("self", "mountinfo")
            except (ProcessGone, AccessDenied, OSError):
                text = ""
            self._mounts = parse_cgroup_mounts(text)
        return self._mounts

    def refresh(self) -> None:
        """Forget the mounts (a hierarchy can be mounted after start)."""
        self._mounts = None

    def locate(self, pid: int) -> Optional[MemCgroup]:
        """The memory cgroup of `pid`, or None where it has none we know of.
        Raises ProcessGone / AccessDenied from /proc."""
        found = memory_cgroup_line(parse_proc_cgroup(self.procfs.read_text(pid, "cgroup")))
        if found is None:
            return None
        version, path = found
        return MemCgroup(version, path, self._directory(version, path))

    def _directory(self, version: int, path: str) -> Optional[str]:
        gaps: list[tuple[CgroupMount, int, list[str]]] = []
        for mount in self.mounts():
            if mount.version != version or (version == 1 and "memory" not in mount.controllers):
                continue
            directory = cgroup_dir(path, mount.root, mount.mount_point)
            if directory is not None and os.path.isdir(self.fs_root + directory):
                return directory
            gap = unresolved_depth(path, mount.root)
            if gap is not None:
                gaps.append((mount, *gap))
        for mount, depth, names in gaps:
            found = self._find_below(mount.mount_point, depth, names)
            if found is not None:
                return found
        return None

    def _find_below(self, mount_point: str, depth: int, names: list[str]) -> Optional[str]:
        """The one directory `depth` unnamed levels below the mount point followed by
        `names`. Bounded: a few levels, a few thousand entries each (a node has a handful
        of slices at the top); two matches are ambiguous and yield None."""
        if depth > _GAP_MAX_DEPTH or not names:
            return None
        level = [mount_point.rstrip("/") or "/"]
        for _ in range(depth):
            below: list[str] = []
            for directory in level:
                try:
                    with os.scandir(self.fs_root + directory) as entries:
                        for index, entry in enumerate(entries):
                            if index >= _GAP_MAX_ENTRIES:
                                break
                            if entry.is_dir(follow_symlinks=False):
                                below.append(_join(directory, [entry.name]))
                except OSError:
                    continue
            level = below
        matches = [
            candidate
            for candidate in (_join(d, names) for d in level)
            if os.path.isdir(self.fs_root + candidate)
        ]
        return matches[0] if len(matches) == 1 else None

    def _read(self, directory: str, name: str, limit: int = 4096) -> Optional[str]:
        try:
            return read_file_text(f"{self.fs_root}{directory}/{name}", limit)
        except (AccessDenied, OSError):
            return None

    def state(self, cgroup: MemCgroup) -> Optional[MemoryState]:
        """Read the cgroup's memory now; None where its directory is not visible."""
        if cgroup.directory is None:
            return None
        if cgroup.version == 1:
            return self._state_v1(cgroup.directory)
        return self._state_v2(cgroup)

    def _int(self, directory: str, name: str, version: int) -> Optional[int]:
        text = self._read(directory, name)
        return None if text is None else parse_limit(text, version)

    def _state_v1(self, directory: str) -> MemoryState:
        stat = parse_flat_keyed(self._read(directory, "memory.stat", _STAT_BYTES) or "")
        limit = self._int(directory, "memory.limit_in_bytes", 1)
        usage = self._int(directory, "memory.usage_in_bytes", 1)
        # v1 already folds the ancestors' limits into one number.
        hierarchical = stat.get("hierarchical_memory_limit")
        effective = None if hierarchical is None else parse_limit(str(hierarchical), 1)
        if hierarchical is None:
            effective = limit
        inactive = stat.get("total_inactive_file", stat.get("inactive_file"))
        oom = parse_flat_keyed(self._read(directory, "memory.oom_control") or "")
        return MemoryState(
            limit_bytes=limit,
            effective_limit_bytes=effective,
            limit_directory=directory if limit is not None else None,
            usage_bytes=usage,
            inactive_file_bytes=inactive,
            working_set_bytes=working_set(usage, inactive),
            oom_group=None,
            oom_kills=oom.get("oom_kill"),
        )

    def _state_v2(self, cgroup: MemCgroup) -> MemoryState:
        directory = cgroup.directory
        assert directory is not None
        stat = parse_flat_keyed(self._read(directory, "memory.stat", _STAT_BYTES) or "")
        limit = self._int(directory, "memory.max", 2)
        usage = self._int(directory, "memory.current", 2)
        effective, where = self._nearest_limit_v2(directory, limit)
        group = self._read(directory, "memory.oom.group")
        events = parse_flat_keyed(self._read(directory, "memory.events") or "")
        inactive = stat.get("inactive_file")
        return MemoryState(
            limit_bytes=limit,
            effective_limit_bytes=effective,
            limit_directory=where,
            usage_bytes=usage,
            inactive_file_bytes=inactive,
            working_set_bytes=working_set(usage, inactive),
            oom_group=None if group is None else group.strip() == "1",
            oom_kills=events.get("oom_kill"),
        )

    def _nearest_limit_v2(
        self, directory: str, own: Optional[int]
    ) -> tuple[Optional[int], Optional[str]]:
        """The nearest memory.max on the way up to the mount point: a container without a
        limit of its own inside a limited pod or slice is limited there."""
        if own is not None:
            return own, directory
        top = self._mount_point_of(directory)
        current = directory
        while top is not None and current.startswith(top) and current != top:
            current = os.path.dirname(current)
            value = self._int(current, "memory.max", 2)
            if value is not None:
                return value, current
        return None, None

    def _mount_point_of(self, directory: str) -> Optional[str]:
        best: Optional[str] = None
        for mount in self.mounts():
            point = mount.mount_point.rstrip("/") or "/"
            inside = directory == point or directory.startswith(point + "/")
            if mount.version == 2 and inside and (best is None or len(point) > len(best)):
                best = point
        return best

    def highest_oom_group(self, cgroup: MemCgroup) -> Optional[str]:
        """The highest directory, from the cgroup up to its mount point, whose
        memory.oom.group is 1; None where none is (or v1, or not visible).

        The kernel (mem_cgroup_get_oom_group) walks from the victim's cgroup up to the one
        whose limit was hit and kills the highest flagged one whole: a flagged ancestor (a
        pod or slice) kills the postmaster's cgroup with it in any OOM that reaches it."""
        if cgroup.version != 2 or cgroup.directory is None:
            return None
        top = self._mount_point_of(cgroup.directory)
        highest: Optional[str] = None
        current = cgroup.directory
        while top is not None:
            text = self._read(current, "memory.oom.group")
            if text is not None and text.strip() == "1":
                highest = current
            if current == top or not current.startswith(top):
                break
            current = os.path.dirname(current)
        return highest

    def observe(self, pid: int) -> CgroupReport:
        """Everything status, verify, doctor and the engine show or decide on for `pid`.
        Raises ProcessGone / AccessDenied from /proc."""
        cgroup = self.locate(pid)
        if cgroup is None:
            return CgroupReport(None, None, None)
        return CgroupReport(cgroup, self.state(cgroup), self.highest_oom_group(cgroup))

    # --- the one cgroup write -----------------------------------------------------------

    def write_oom_group(self, cgroup: MemCgroup, enabled: bool) -> None:
        """Set memory.oom.group of that cgroup (v2). O_NOFOLLOW: cgroupfs has no symlinks,
        so one on the way is someone else's plant. Raises AccessDenied (read-only cgroupfs,
        no permission) or OSError."""
        if cgroup.version != 2 or cgroup.directory is None:
            raise OSError(errno.EINVAL, "memory.oom.group exists only on a visible v2 cgroup")
        path = f"{self.fs_root}{cgroup.directory}/memory.oom.group"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except PermissionError as err:
            raise AccessDenied(f"{path}: {os.strerror(err.errno or errno.EACCES)}") from err
        except OSError as err:
            if err.errno == errno.EROFS:
                raise AccessDenied(f"{path}: read-only file system") from err
            raise
        try:
            os.write(fd, b"1" if enabled else b"0")
        finally:
            os.close(fd)


def group_kill(cgroup: Optional[MemCgroup], state: Optional[MemoryState]) -> Optional[bool]:
    """Does a memcg OOM in this cgroup kill every task of it? True/False where known; None
    where the cgroup or its flag cannot be seen."""
    if cgroup is None:
        return None
    if cgroup.version == 1:
        return False
    return None if state is None else state.oom_group
