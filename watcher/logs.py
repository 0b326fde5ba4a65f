"""Logging: stderr plus a bounded, rotated file, optionally JSON lines for log shippers.

The file sink is ours rather than loguru's path sink because the default path lives in
/tmp: as root, opening a name an unprivileged user could have planted must not follow a
symlink (O_NOFOLLOW), nor append to a file someone else owns.
"""

from __future__ import annotations

import os
import stat
import sys
from typing import Optional

from loguru import logger

FORMAT = "{time:YYYY-MM-DDTHH:mm:ss.SSSZZ} {level: <7} pgoom[{process}] {message}"
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 3


class UnsafeLogPath(Exception):
    pass


class SafeFileSink:
    """Append-only file sink that never follows a symlink and rotates at `max_bytes`,
    keeping `backups` old files (path.1 ... path.N): at most (backups + 1) * max_bytes."""

    def __init__(
        self, path: str, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd = self._open(exclusive=False)
        self._size = os.fstat(self._fd).st_size

    def _open(self, exclusive: bool) -> int:
        # O_NONBLOCK: a FIFO planted at the path would block open() for ever (ENXIO instead);
        # it changes nothing for a regular file.
        flags = (
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        )
        if exclusive:
            flags |= os.O_EXCL
        try:
            fd = os.open(self.path, flags, 0o640)
        except OSError as err:
            raise UnsafeLogPath(f"cannot open {self.path}: {os.strerror(err.errno or 0)}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            os.close(fd)
            raise UnsafeLogPath(
                f"{self.path} is not a regular file owned by uid {os.geteuid()}: remove it or "
                "choose another --log-file"
            )
        return fd

    def write(self, message: str) -> None:
        data = message.encode("utf-8", "replace")
        if self._size + len(data) > self.max_bytes and self._size > 0:
            self._rotate()
        os.write(self._fd, data)
        self._size += len(data)

    def _rotate(self) -> None:
        os.close(self._fd)
        # rename() acts on names, never through symlinks: a planted path.N is replaced.
        for index in range(self.backups, 0, -1):
            older = f"{self.path}.{index - 1}" if index > 1 else self.path
            try:
                os.replace(older, f"{self.path}.{index}")
            except FileNotFoundError:
                pass
        self._fd = self._open(exclusive=True)
        self._size = 0

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass


def setup_logging(
    log_file: Optional[str],
    json: bool = False,
    level: str = "INFO",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Optional[SafeFileSink]:
    logger.remove()
    logger.add(
        sys.stderr, level=level, format=FORMAT, serialize=json, backtrace=False, diagnose=False
    )
    if not log_file:
        return None
    try:
        sink = SafeFileSink(log_file, max_bytes=max_bytes)
    except UnsafeLogPath as err:
        logger.warning("not logging to a file: {}", err)
        return None
    logger.add(
        sink.write, level=level, format=FORMAT, serialize=json, backtrace=False, diagnose=False
    )
    return sink
