"""How much memory a protected postmaster's cgroup (or the host) holds, and how much of it
is pressure.

Parsers are pure functions over the files' text; `MemoryReader` is the thin reader, with
its directory injectable so unit tests run on fake cgroup trees built from captured files.

Usage counts page cache, which the kernel drops before it OOM-kills anything: a big file
read fills a cgroup to its limit and threatens nobody. The guard decides on the *working
set* instead: usage minus the page cache the kernel can reclaim, i.e. every file page except
shmem (tmpfs, shared memory: without swap it cannot be reclaimed).

That is stricter than kubelet's working set (usage minus *inactive* file only). A file read
twice is on the active list, and kubelet counts it; the kernel still reclaims it before it
OOM-kills. Measured here (cgroup v1, 300 MiB, one session holding 256 MiB, a 300 MiB file
written and read back in a loop): usage minus inactive file reached 295 MiB, and a guard
deciding on it terminated the idle session: a false positive this definition does not make.

Usage and memory.stat are two files, read one after the other: the kernel gives no snapshot
of both. Page cache can vanish between the two reads (a file truncated or deleted drops all
of its cache at once), and usage read before it minus the cache left after it is memory
nobody holds. Measured here (cgroup v1, 300 MiB, 255 MiB held, both CPUs busy): the guard's
thread read usage (299 MiB), was off the CPU for 104 ms while dd's O_TRUNC dropped 42 MiB of
cache, then read memory.stat: a "working set" of 299 MiB where 257 were in use, above the
270 MiB threshold. With a busy thread in the guard's process the same happened often enough
for the guard to terminate the idle 244 MiB session. So `MemoryReader` reads usage before
and after memory.stat and keeps a reading only when the two agree and the reads were quick
(see `steady`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from loguru import logger

from watcher.memcg import parse_flat_keyed, parse_limit
from watcher.memcg import working_set as memcg_working_set

_READ_BYTES = 65536
# Bounds of the walk over a group's tasks (the kernel's OOM candidates, for kernel_choice).
_MAX_MEMBERS = 16384
_MAX_GROUPS = 256
_MAX_DEPTH = 16
MIB = 1 << 20
# A reading whose usage moved by more than 1 % of the limit (the thresholds' step) between
# the reads before and after memory.stat, or that took longer than this, is taken again. The
# three reads take 30-190 us here (p50-p99, both CPUs busy); a reading that took 2 ms was
# interrupted, long enough for cache to be dropped and refilled in between.
STEADY_WITHIN_NS = 2_000_000
STEADY_SHARE_PCT = 1.0
READ_ATTEMPTS = 4


@dataclass(frozen=True)
class Sample:
    """One reading. `limit_bytes` None: nothing limits this memory but the host."""

    usage_bytes: int
    working_set_bytes: int
    limit_bytes: Optional[int]

    def percent(self) -> Optional[float]:
        if not self.limit_bytes:
            return None
        return 100.0 * self.working_set_bytes / self.limit_bytes


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo in bytes (the file says kB and means KiB)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        fields = rest.split()
        if sep and fields and fields[0].isdigit():
            scale = 1024 if len(fields) > 1 and fields[1] == "kB" else 1
            values[key] = int(fields[0]) * scale
    return values


def working_set(usage_bytes: int, reclaimable_file_bytes: int) -> int:
    ws = memcg_working_set(usage_bytes, reclaimable_file_bytes)
    assert ws is not None
    return ws


def reclaimable_file(stat: dict[str, int], file_key: str, shmem_key: str) -> int:
    """File pages minus shmem; where the kernel gives no such split, inactive file."""
    if file_key in stat:
        return max(0, stat[file_key] - stat.get(shmem_key, 0))
    return stat.get("total_inactive_file", stat.get("inactive_file", 0))


def v1_sample(usage_text: str, stat_text: str, limit_text: str) -> Sample:
    stat = parse_flat_keyed(stat_text)
    usage = int(usage_text.strip())
    # v1's "cache" is file pages including shmem; total_* fields include descendants, as
    # usage_in_bytes does.
    if "total_cache" in stat:
        reclaimable = reclaimable_file(stat, "total_cache", "total_shmem")
    else:
        reclaimable = reclaimable_file(stat, "cache", "shmem")
    limit = parse_limit(limit_text, 1)
    # A group without a limit of its own is still bounded by its ancestors' limits, which
    # the kernel reports as hierarchical_memory_limit.
    hierarchical = stat.get("hierarchical_memory_limit")
    bound = None if hierarchical is None else parse_limit(str(hierarchical), 1)
    if bound is not None:
        limit = bound if limit is None else min(limit, bound)
    return Sample(usage, working_set(usage, reclaimable), limit)


def v2_sample(current_text: str, stat_text: str, limit_text: Optional[str]) -> Sample:
    """`limit_text`: memory.max of the nearest cgroup on the way up that has one."""
    stat = parse_flat_keyed(stat_text)
    usage = int(current_text.strip())
    limit = None if limit_text is None else parse_limit(limit_text, 2)
    # v2's "file" includes shmem, like v1's cache.
    return Sample(usage, working_set(usage, reclaimable_file(stat, "file", "shmem")), limit)


def host_sample(meminfo_text: str) -> Sample:
    """The bare host: what is in use is MemTotal - MemAvailable (MemAvailable already counts
    the cache the kernel can drop), bounded by MemTotal."""
    info = parse_meminfo(meminfo_text)
    total = info["MemTotal"]
    available = info.get("MemAvailable", info.get("MemFree", 0))
    used = max(0, total - available)
    return Sample(total - info.get("MemFree", 0), used, total)


def read_small(path: str) -> str:
    """One read of a kernel-generated file (cgroupfs, /proc): they are small and generated at
    open, so one read returns all of it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, _READ_BYTES).decode("ascii", "replace")
    finally:
        os.close(fd)


@dataclass(frozen=True)
class MemoryGroup:
    """Where a postmaster's memory is accounted: cgroup `version` (1 or 2) and `directory`,
    or version 0 for the bare host (`directory` is then the /proc root). `limit_directory`
    (v2): the nearest cgroup on the way up whose memory.max is set, which decides the OOM
    (v1 folds the ancestors' limits into hierarchical_memory_limit)."""

    version: int
    directory: str
    limit_directory: Optional[str] = None

    @property
    def name(self) -> str:
        return "host" if self.version == 0 else self.directory


def steady(
    before_bytes: int, after_bytes: int, elapsed_ns: int, limit_bytes: Optional[int]
) -> bool:
    """Whether usage read before and after memory.stat (`elapsed_ns` apart) describes the
    moment memory.stat was read: it barely moved, and nothing could happen in between."""
    tolerance = max(MIB, int((limit_bytes or 0) * STEADY_SHARE_PCT / 100.0))
    return abs(after_bytes - before_bytes) <= tolerance and elapsed_ns <= STEADY_WITHIN_NS


class MemoryReader:
    """Reads one Sample of a MemoryGroup: three small files on the pressure path (fewer than
    watcher.memcg's full state, which also reads the OOM counters and flags), usage twice.
    `read` and `clock_ns` are injectable for unit tests."""

    def __init__(
        self,
        group: MemoryGroup,
        read: Callable[[str], str] = read_small,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.group = group
        self._read = read
        self._clock_ns = clock_ns

    def sample(self) -> Sample:
        d = self.group.directory
        read = self._read
        if self.group.version == 0:
            return host_sample(read(f"{d}/meminfo"))  # one file: consistent as it is
        if self.group.version == 1:
            usage_path = f"{d}/memory.usage_in_bytes"
            limit_text: Optional[str] = read(f"{d}/memory.limit_in_bytes")
        else:
            usage_path = f"{d}/memory.current"
            where = self.group.limit_directory
            limit_text = read(f"{where}/memory.max") if where else None
        for _ in range(READ_ATTEMPTS):
            start_ns = self._clock_ns()
            before = read(usage_path)
            stat = read(f"{d}/memory.stat")
            after = read(usage_path)
            elapsed_ns = self._clock_ns() - start_ns
            # The lower usage: cache dropped between the reads was dropped from usage too
            # (and cache added in between can only make this reading low, never high).
            usage = min(before, after, key=int)
            if self.group.version == 1:
                assert limit_text is not None
                sample = v1_sample(usage, stat, limit_text)
            else:
                sample = v2_sample(usage, stat, limit_text)
            if steady(int(before), int(after), elapsed_ns, sample.limit_bytes):
                return sample
        logger.debug(
            "guard: {}: usage kept moving while memory.stat was read ({} attempts); "
            "taking the lower reading",
            d,
            READ_ATTEMPTS,
        )
        return sample

    def member_pids(self, procfs_root: str = "/proc") -> list[int]:
        """The processes the kernel's OOM killer chooses among when this group runs out of
        memory: every task of the cgroup that holds the limit and of the cgroups below it (for
        the host, every process). Bounded: a group may be full of sub-cgroups its tenant made."""
        if self.group.version == 0:
            try:
                return [int(name) for name in os.listdir(procfs_root) if name.isdigit()]
            except OSError:
                return []
        top = self.group.limit_directory or self.group.directory
        pids: list[int] = []
        pending, seen = [(top, 0)], 0
        while pending and seen < _MAX_GROUPS and len(pids) < _MAX_MEMBERS:
            directory, depth = pending.pop()
            seen += 1
            try:
                text = _read_bounded(f"{directory}/cgroup.procs", _MAX_MEMBERS * 8)
                pids.extend(int(word) for word in text.split() if word.isdigit())
                if depth < _MAX_DEPTH:
                    with os.scandir(directory) as entries:
                        for entry in entries:
                            if entry.is_dir(follow_symlinks=False):
                                pending.append((entry.path, depth + 1))
            except OSError:
                continue  # removed while walked: its tasks are gone or moved
        return pids[:_MAX_MEMBERS]

    def group_kill(self) -> bool:
        """Whether an OOM kill here takes the whole cgroup (v2 memory.oom.group set on the
        postmaster's cgroup or on one between it and the cgroup that holds the limit, which
        the kernel's mem_cgroup_get_oom_group walks). Then any OOM kill costs PostgreSQL every
        backend, whoever the kernel picks."""
        if self.group.version != 2:
            return False
        top = os.path.normpath(self.group.limit_directory or self.group.directory)
        directory = os.path.normpath(self.group.directory)
        for _ in range(_MAX_DEPTH * 2):
            try:
                if read_small(f"{directory}/memory.oom.group").strip() == "1":
                    return True
            except OSError:
                pass
            if directory == top or os.path.dirname(directory) == directory:
                return False
            directory = os.path.dirname(directory)
        return False


def _read_bounded(path: str, limit: int) -> str:
    """Up to `limit` bytes of a cgroup file that may be longer than one read (cgroup.procs)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks: list[bytes] = []
        size = 0
        while size < limit:
            chunk = os.read(fd, min(_READ_BYTES, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks).decode("ascii", "replace")
    finally:
        os.close(fd)
