"""The one module that reads and writes /proc.

The root is injectable (`ProcFS("/tmp/fake-proc")`) so unit tests run on fake trees built
from captured samples. Every OSError is translated here, and only here: a process that
went away (ENOENT, ESRCH) becomes ProcessGone, a refusal (EACCES, EPERM) AccessDenied.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from stat import S_ISREG
from typing import Optional

from watcher.errors import AccessDenied, ProcessGone
from watcher.parse import (
    Stat,
    parse_cmdline,
    parse_oom_score_adj,
    parse_stat,
    parse_status,
)

_GONE = frozenset({errno.ENOENT, errno.ESRCH})
_READ_BYTES = 65536
_DENIED = frozenset({errno.EACCES, errno.EPERM})


def translated(err: OSError, pid: int, what: str) -> Exception:
    """The error to raise for an OSError from /proc: gone, denied, or the error itself."""
    if err.errno in _GONE:
        return ProcessGone(f"pid {pid} is gone ({what})")
    if err.errno in _DENIED:
        return AccessDenied(f"pid {pid}: {what}: {os.strerror(err.errno)}")
    return err


@contextmanager
def translate_errors(pid: int, what: str) -> Iterator[None]:
    try:
        yield
    except OSError as err:
        raise translated(err, pid, what) from err


class ProcFS:
    def __init__(self, root: str = "/proc") -> None:
        self.root = root.rstrip("/") or "/"

    def path(self, pid: int | str, name: str = "") -> str:
        return f"{self.root}/{pid}/{name}" if name else f"{self.root}/{pid}"

    # --- reads -----------------------------------------------------------------------

    def pids(self) -> list[int]:
        return [int(name) for name in os.listdir(self.root) if name.isdigit()]

    def read_bytes(self, pid: int | str, name: str) -> bytes:
        # The exec -> protected path reads half a dozen of these files: one open, one read
        # and one close each, no buffered file object, no context manager. The kernel
        # generates a /proc file of this size in one read, so a short read is the whole of
        # it; only a full buffer needs another read.
        try:
            fd = os.open(self.path(pid, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.read(fd, _READ_BYTES)
                if len(data) == _READ_BYTES:
                    chunks = [data]
                    while chunk := os.read(fd, _READ_BYTES):
                        chunks.append(chunk)
                    data = b"".join(chunks)
            finally:
                os.close(fd)
        except OSError as err:
            raise translated(err, int(pid) if str(pid).isdigit() else 0, name) from err
        return data

    def read_text(self, pid: int | str, name: str) -> str:
        return self.read_bytes(pid, name).decode("utf-8", "surrogateescape")

    def stat(self, pid: int) -> Stat:
        text = self.read_text(pid, "stat")
        if not text:
            raise ProcessGone(f"pid {pid} is gone (empty stat)")
        return parse_stat(text)

    def cmdline(self, pid: int) -> list[str]:
        return parse_cmdline(self.read_bytes(pid, "cmdline"))

    def status(self, pid: int | str) -> dict[str, str]:
        return parse_status(self.read_text(pid, "status"))

    def environ(self, pid: int) -> bytes:
        return self.read_bytes(pid, "environ")

    def readlink(self, pid: int, name: str) -> str:
        with translate_errors(pid, name):
            return os.readlink(self.path(pid, name))

    def exe(self, pid: int) -> str:
        return self.readlink(pid, "exe")

    def cwd(self, pid: int) -> str:
        return self.readlink(pid, "cwd")

    def oom_score_adj(self, pid: int) -> int:
        return parse_oom_score_adj(self._nonempty(pid, "oom_score_adj"))

    def oom_score(self, pid: int) -> int:
        return int(self._nonempty(pid, "oom_score").strip())

    def _nonempty(self, pid: int, name: str) -> str:
        # A process caught in exit can answer a read with nothing: that is gone, not garbage.
        text = self.read_text(pid, name)
        if not text.strip():
            raise ProcessGone(f"pid {pid} is gone (empty {name})")
        return text

    def children(self, pid: int) -> list[int]:
        """Direct children, from /proc/<pid>/task/<pid>/children (CONFIG_PROC_CHILDREN);
        threads other than the leader cannot fork postmaster children, so one file suffices."""
        text = self.read_text(pid, f"task/{pid}/children")
        return [int(tok) for tok in text.split()]

    def in_process_root(self, pid: int, path: str) -> str:
        """`path` as the process sees it: through /proc/<pid>/root, which crosses mount
        namespaces, so a host-wide watcher reads a container's data directory."""
        return self.path(pid, "root") + path if path.startswith("/") else path

    def boot_time_s(self) -> float:
        for line in self.read_text("", "stat").splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
        raise RuntimeError("no btime in /proc/stat")

    def start_epoch_s(self, stat: Stat) -> float:
        return self.boot_time_s() + stat.starttime_ticks / CLOCK_TICKS

    def exists(self, pid: int) -> bool:
        """A cheap 'is /proc/<pid> there': no read, no parse."""
        return os.path.exists(self.path(pid))

    def rss_kib(self, pid: int) -> Optional[int]:
        """Resident set size from status (VmRSS); None for a kernel thread (no VmRSS)."""
        text = self.status(pid).get("VmRSS", "")
        return int(text.split()[0]) if text.split() and text.split()[0].isdigit() else None

    def read_system(self, name: str) -> str:
        """A /proc file that belongs to no process: meminfo, sys/vm/overcommit_memory."""
        return self.read_text("", name)

    def self_status(self) -> dict[str, str]:
        return self.status("self")

    # --- the one write ---------------------------------------------------------------

    def write_oom_score_adj(self, pid: int, value: int) -> None:
        with translate_errors(pid, "write oom_score_adj"):
            fd = os.open(self.path(pid, "oom_score_adj"), os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, str(value).encode())
            finally:
                os.close(fd)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def read_file_text(path: str, limit: int = 65536) -> Optional[str]:
    """Read a small regular file that may not exist yet (postmaster.pid); None if absent.
    EACCES propagates as AccessDenied so the caller can tell 'absent' from 'hidden'.

    Anything but a regular file counts as absent: the data directory's owner could plant a
    FIFO there, and a blocking open() of it would hang a watcher running as root."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError as err:
        raise AccessDenied(f"{path}: {os.strerror(err.errno or errno.EACCES)}") from err
    try:
        if not S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit).decode("utf-8", "surrogateescape")
    finally:
        os.close(fd)
