"""Is a process's executable a PostgreSQL server we may trust? Decided on ownership first,
content second, never on the name alone.

Trust, as sudo and systemd decide it for the programs they run as root: the executable and
every directory above it owned by root and writable by nobody else (no group or other write
bit, sticky or not) — then only root could have put that file there. A server built in a
user's home is trusted only when the operator lists its path (`trusted_binaries`). The path
is judged as the process sees it, through /proc/<pid>/root, so a container's
/usr/pgsql-16/bin/postgres is judged in the container's file system. The file judged is the
very inode the process runs (/proc/<pid>/exe), which still reaches a binary that a package
upgrade replaced on disk.

Content, the second signal: the server binary is the one that exports PostmasterMain
(extensions link against the server, so the symbol sits in the dynamic string table even of
stripped builds, ~450 KB into Debian's 9 MB binary: 0.3 ms to find). Any ELF can contain that
string, so content alone decides nothing; it catches a trusted path that holds another
program (a root-owned /usr/local/bin/postgres that is a wrapper script). Content verdicts are
cached per inode; trust is judged afresh each time (a handful of lstat calls).
"""

from __future__ import annotations

import mmap
import os
import posixpath
import stat
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Optional

from watcher.untrusted import shown

_MARKER = b"\0PostmasterMain\0"
_CACHE_MAX = 64
_cache: dict[tuple[int, int, int, int], bool] = {}
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


@dataclass(frozen=True)
class Executable:
    trusted: Optional[bool]  # None: could not be judged (no access to the process's root)
    server: Optional[bool]  # PostmasterMain exported; None: unreadable
    reason: str  # why not trusted ("" when trusted)


def judge(exe_link: str, root: str, exe: str, trusted_paths: Collection[str] = ()) -> Executable:
    """Judge the executable a process runs. `exe_link` is /proc/<pid>/exe (opened, never
    followed by name), `root` /proc/<pid>/root, `exe` the link's target as the process
    names it (without the kernel's ' (deleted)')."""
    try:
        fd = os.open(exe_link, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return Executable(None, None, "executable unreadable")
    try:
        info = os.fstat(fd)
        server = _exports_postmaster_main(fd, info)
    finally:
        os.close(fd)
    if exe in trusted_paths:
        return Executable(True, server, "")
    trusted, reason = _trust(info, root, exe)
    return Executable(trusted, server, reason)


def _trust(info: os.stat_result, root: str, exe: str) -> tuple[Optional[bool], str]:
    problem = _not_roots_alone(info, stat.S_ISREG, f"executable {shown(exe)}", "a regular file")
    if problem:
        return False, problem
    if not exe.startswith("/"):
        return None, f"executable path {shown(exe)} is not absolute"
    try:
        os.lstat(root + "/")
    except OSError:
        return None, "the process's root is not reachable (no ptrace access)"
    directory = posixpath.dirname(exe)
    while True:
        try:
            dinfo = os.lstat(root + directory if directory != "/" else root + "/")
        except OSError:
            return None, f"directory {shown(directory)} of the executable is gone"
        problem = _not_roots_alone(dinfo, stat.S_ISDIR, f"directory {shown(directory)}", "one")
        if problem:
            return False, problem
        if directory == "/":
            return True, ""
        directory = posixpath.dirname(directory)


def _not_roots_alone(info: os.stat_result, is_kind: Any, what: str, kind: str) -> str:
    """Why only root could not have put this here ('' when only root could): not of the
    kind (a symlink swapped in), not root's, or writable by group or others."""
    if not is_kind(info.st_mode):
        return f"{what} is not {kind}"
    if info.st_uid != 0:
        return f"{what} belongs to uid {info.st_uid}, not root"
    if info.st_mode & _WRITABLE_BY_OTHERS:
        return f"{what} is writable by group or others"
    return ""


def _exports_postmaster_main(fd: int, info: os.stat_result) -> Optional[bool]:
    key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    cached = _cache.get(key)
    if cached is not None:
        return cached
    try:
        if info.st_size == 0 or not stat.S_ISREG(info.st_mode):
            found = False
        else:
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
                found = mapped.find(_MARKER) >= 0
    except (OSError, ValueError):
        return None
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[key] = found
    return found


def is_postgres_server(path: str) -> Optional[bool]:
    """The content signal alone, for a path: True/False for a readable file, None when it
    cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return _exports_postmaster_main(fd, os.fstat(fd))
    except OSError:
        return None
    finally:
        os.close(fd)
