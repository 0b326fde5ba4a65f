"""A memory cgroup the harness creates, fills with its own processes, and removes.

cgroup v1 (memory controller mounted at /sys/fs/cgroup/memory, as on this project's
machines) or v2 (the unified hierarchy with the memory controller, as on GitHub's Ubuntu
runners). Swap is switched off inside the group where the host allows it: a runner with
swap would otherwise page out instead of reaching the OOM killer.
"""

from __future__ import annotations

import errno
import os
import signal
import time
import uuid
from typing import Optional

V1_ROOT = "/sys/fs/cgroup/memory"
V2_ROOT = "/sys/fs/cgroup"


class CgroupError(RuntimeError):
    pass


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def detect() -> tuple[int, str]:
    """(version, parent directory) of a usable memory controller."""
    if os.path.exists(f"{V1_ROOT}/memory.limit_in_bytes"):
        return 1, V1_ROOT
    controllers = f"{V2_ROOT}/cgroup.controllers"
    if os.path.exists(controllers) and "memory" in _read(controllers).split():
        subtree = f"{V2_ROOT}/cgroup.subtree_control"
        if "memory" not in _read(subtree).split():
            try:
                _write(subtree, "+memory")
            except OSError as err:
                raise CgroupError(
                    f"cannot enable the memory controller in {subtree}: {err}"
                ) from None
        return 2, V2_ROOT
    raise CgroupError(
        "no memory cgroup controller: need cgroup v1 at /sys/fs/cgroup/memory or cgroup v2 "
        "with 'memory' in /sys/fs/cgroup/cgroup.controllers"
    )


class MemoryCgroup:
    def __init__(
        self, limit_bytes: int, prefix: str = "pgoom-harness", oom_group: int = 0
    ) -> None:
        self.version, parent = detect()
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.path = f"{parent}/{self.name}"
        self.oom_group = oom_group
        os.mkdir(self.path)
        try:
            self._configure(limit_bytes)
        except BaseException:
            os.rmdir(self.path)
            raise
        self.limit_bytes = limit_bytes

    def _configure(self, limit_bytes: int) -> None:
        if self.version == 1:
            if self.oom_group:
                raise CgroupError("memory.oom.group needs cgroup v2 (this host has v1)")
            _write(f"{self.path}/memory.limit_in_bytes", str(limit_bytes))
            memsw = f"{self.path}/memory.memsw.limit_in_bytes"
            if os.path.exists(memsw):
                _write(memsw, str(limit_bytes))  # memory+swap = memory: no swap
            else:
                _write(f"{self.path}/memory.swappiness", "0")
        else:
            _write(f"{self.path}/memory.max", str(limit_bytes))
            if os.path.exists(f"{self.path}/memory.swap.max"):
                _write(f"{self.path}/memory.swap.max", "0")
            if os.path.exists(f"{self.path}/memory.oom.group"):
                # Kubelet sets 1 on v2 (kills the whole container but tasks at -1000); the
                # default 0 measures the per-process choice, which oom_score_adj steers.
                _write(f"{self.path}/memory.oom.group", str(self.oom_group))
            elif self.oom_group:
                raise CgroupError(f"{self.path}: no memory.oom.group (kernel older than 4.19)")

    @property
    def procs_file(self) -> str:
        return f"{self.path}/cgroup.procs"

    @property
    def kernel_path(self) -> str:
        """The group as the kernel names it in OOM reports (oom_memcg=...)."""
        return f"/{self.name}"

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in _read(self.procs_file).split()]
        except FileNotFoundError:
            return []

    def oom_kills(self) -> int:
        """The kernel's count of processes its OOM killer took from this group."""
        if self.version == 1:
            text = _read(f"{self.path}/memory.oom_control")
        else:
            text = _read(f"{self.path}/memory.events")
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        raise CgroupError(f"no oom_kill counter in {self.path} (kernel older than 4.13?)")

    def usage_bytes(self) -> int:
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        return int(_read(f"{self.path}/{name}"))

    def remove(self, timeout_s: float = 15.0) -> Optional[str]:
        """Kill what is left inside (only the harness's own processes can be there: it
        created the group), then remove it. Returns a problem description or None."""
        deadline = time.monotonic() + timeout_s
        while os.path.isdir(self.path):
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.rmdir(self.path)
                return None
            except OSError as err:
                if err.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    return f"cannot remove {self.path}: {err}"
            if time.monotonic() > deadline:
                return f"cannot remove {self.path}: still busy after {timeout_s} s"
            time.sleep(0.05)
        return None


def enter(procs_file: str) -> None:
    """For preexec_fn: move the calling (forked, not yet exec'd) process into the group, so
    everything it starts is charged to the group from its first page."""
    _write(procs_file, str(os.getpid()))
