"""Logging: stderr plus a bounded, rotated file, optionally JSON lines for log shippers.

The file sink is ours rather than loguru's path sink because the default path lives in
/tmp, a directory every local user can write: loguru opens its file with a plain open()
(it follows a planted symlink and appends to a file another user owns, as root) and its
rotation renames over whatever sits at the new name. Here, as root:
- the log is opened with O_NOFOLLOW | O_NONBLOCK and kept only if it is a regular file
  this user owns (a FIFO or another user's file is refused at start, with the fix);
- rotation renames only files this user owns, never onto a name another user took
  (link + unlink fails on an existing name where rename would replace it), and when a
  slot is taken the oldest log of ours is dropped or the current one emptied instead:
  the bound holds whatever others create next to the log;
- a write that fails (disk full, a closed descriptor) loses that line in the file, never
  the watcher: the sink never raises, so loguru never prints its handler traceback.
Every message is escaped and bounded once more at the end (watcher.untrusted): a field
from another user that a caller forgot to pass through shown() still cannot forge a line.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from typing import Any, Optional

from loguru import logger

from watcher.untrusted import MESSAGE_MAX_CHARS, shown

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
        try:
            if self._size + len(data) > self.max_bytes and self._size > 0:
                self._rotate()
            if self._fd >= 0:
                os.write(self._fd, data)
                self._size += len(data)
        except OSError:
            pass  # the line still reached stderr; protection goes on

    def reopen(self) -> None:
        """SIGHUP after logrotate moved the file away: continue in a new file at the path
        (or in the current one, if the path is unusable now)."""
        try:
            fd = self._open(exclusive=False)
        except UnsafeLogPath:
            return
        self._replace_fd(fd, os.fstat(fd).st_size)

    def _rotate(self) -> None:
        if not self._shift(self.path, f"{self.path}.1", current=True):
            # The first slot is taken by something not ours: keep our own file, emptied.
            os.ftruncate(self._fd, 0)
            self._size = 0
            return
        try:
            fd = self._open(exclusive=True)
        except UnsafeLogPath:
            # Someone created the name between the rename and the open: our fd now names
            # path.1, which we own; empty it rather than write into theirs.
            os.ftruncate(self._fd, 0)
            self._size = 0
            return
        self._replace_fd(fd, 0)

    def _shift(self, source: str, target: str, current: bool) -> bool:
        """Move our `source` to `target`, first making room by shifting the older backups.
        False when `source` could not be moved (then it is left as it is)."""
        index = int(target.rsplit(".", 1)[1])
        if os.path.lexists(target):
            if not self._owned(target):
                return False
            if index < self.backups:
                older = f"{self.path}.{index + 1}"
                if not self._shift(target, older, current=False):
                    _remove_own(target)  # the next slot is not ours: drop our oldest log
            elif not os.path.isdir(target):
                _remove_own(target)  # beyond the kept backups
        if not self._owned(source, current):
            return False
        try:
            # link + unlink is a rename that fails on an existing name (a name planted in
            # the meantime) instead of replacing it.
            os.link(source, target, follow_symlinks=False)
        except OSError:
            return False
        _remove_own(source)
        return True

    def _owned(self, name: str, current: bool = False) -> bool:
        """A name this user owns and may move or remove: not a directory; for the live log,
        the very file our descriptor writes to."""
        try:
            info = os.lstat(name)
        except OSError:
            return False
        if info.st_uid != os.geteuid() or stat.S_ISDIR(info.st_mode):
            return False
        if current:
            own = os.fstat(self._fd)
            return (info.st_dev, info.st_ino) == (own.st_dev, own.st_ino)
        return True

    def _replace_fd(self, fd: int, size: int) -> None:
        old, self._fd, self._size = self._fd, fd, size
        if old >= 0:
            try:
                os.close(old)
            except OSError:
                pass

    def close(self) -> None:
        # -1 first: a later close must never hit a descriptor number reused by another
        # object (the epoll fd, in the crash this replaced).
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def _remove_own(name: str) -> None:
    with contextlib.suppress(OSError):  # gone already, or not removable: the bound holds
        os.unlink(name)


def _bounded(record: Any) -> None:
    """loguru patcher: the last defence on every message (see the module docstring)."""
    record["message"] = shown(record["message"], MESSAGE_MAX_CHARS)


def _to_stderr(message: str) -> None:
    # A closed or broken stderr (EPIPE, EBADF, None when fd 2 was closed at start) must
    # cost only the line: the watcher keeps protecting.
    stream = sys.stderr
    if stream is None:
        return
    try:
        stream.write(message)
        stream.flush()
    except (OSError, ValueError):
        pass


def setup_logging(
    log_file: Optional[str],
    json: bool = False,
    level: str = "INFO",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Optional[SafeFileSink]:
    logger.remove()
    logger.configure(patcher=_bounded)
    logger.add(
        _to_stderr, level=level, format=FORMAT, serialize=json, backtrace=False, diagnose=False
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
