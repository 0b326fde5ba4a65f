"""Is an executable really a PostgreSQL server? Decided by content, not by name.

A copy of /bin/sleep saved as .../postgres has the right name; the server binary is the one
that exports PostmasterMain (extensions link against the server, so the symbol sits in the
dynamic string table even of stripped builds, ~450 KB into Debian's 9 MB binary: 0.3 ms to
find). Anything else is scanned to the end once, and every verdict is cached per inode.
"""

from __future__ import annotations

import mmap
import os
from typing import Optional

_MARKER = b"\0PostmasterMain\0"
_CACHE_MAX = 64
_cache: dict[tuple[int, int, int, int], bool] = {}


def is_postgres_server(path: str) -> Optional[bool]:
    """True/False for a readable executable; None when it cannot be opened (no ptrace access
    to /proc/<pid>/exe, or gone). `path` may be /proc/<pid>/exe, which reaches the binary the
    process runs even when it was deleted or replaced on disk."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        cached = _cache.get(key)
        if cached is not None:
            return cached
        if info.st_size == 0:
            found = False
        else:
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
                found = mapped.find(_MARKER) >= 0
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[key] = found
    return found
