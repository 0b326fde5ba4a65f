"""The inotify source: watch each data directory for PostgreSQL's lock file, postmaster.pid.

Works in any namespace (a sidecar, a container without the proc connector). PostgreSQL
creates postmaster.pid directly, with no rename: IN_CREATE (the file may still be empty),
then about six IN_MODIFY/IN_CLOSE_WRITE pairs as the postmaster adds lines. Line 1, the
postmaster's PID, is complete after the first write, so the first IN_MODIFY whose read
parses names the postmaster; later writes of the same file are skipped (one Examine per
file generation). A crash-restart only rewrites the file (same PID); a clean stop deletes
it; a SIGKILLed postmaster leaves it behind until the next start deletes and recreates it.

A data directory that does not exist yet is waited for: the nearest existing ancestor is
watched for the next path component, and the watch moves down as components appear. A
directory that is removed or renamed away sends IN_DELETE_SELF / IN_MOVE_SELF, and the
source goes back to waiting for it. Limitation: renaming a directory *above* a watched data
directory sends nothing to the data directory's watch; the watch then follows the inode.

inotify is used through ctypes on libc (no dependency); decoding of the kernel's
`struct inotify_event` records is the pure function decode_events().
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import posixpath
import struct
import time
from dataclasses import dataclass
from typing import Optional

from loguru import logger

from watcher.errors import AccessDenied, SourceUnavailable
from watcher.parse import parse_postmaster_pid
from watcher.procfs import ProcFS, read_file_text
from watcher.sources.base import Event, Examine, Rescan

# <sys/inotify.h>; the values are part of the kernel ABI.
IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_MASK_ADD = 0x20000000
IN_ISDIR = 0x40000000
# inotify_init1 flags are the open(2) flags of the same names.
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

PIDFILE = "postmaster.pid"

# On a data directory: the lock file's life, and the directory's own disappearance
# (IN_DELETE_SELF, IN_MOVE_SELF; IN_IGNORED and IN_UNMOUNT are always reported).
DATA_DIR_MASK = (
    IN_CREATE
    | IN_MODIFY
    | IN_CLOSE_WRITE
    | IN_DELETE
    | IN_MOVED_TO
    | IN_MOVED_FROM
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)
# On the nearest existing ancestor of a data directory that does not exist yet: the next
# path component appearing (mkdir or rename), or the ancestor itself going away.
ANCESTOR_MASK = IN_CREATE | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR

_PIDFILE_CHANGED = IN_CREATE | IN_MOVED_TO | IN_MODIFY | IN_CLOSE_WRITE
_PIDFILE_NEW = IN_CREATE | IN_MOVED_TO
_PIDFILE_GONE = IN_DELETE | IN_MOVED_FROM
_WATCH_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED | IN_UNMOUNT

_HEADER = struct.Struct("=iIII")  # int wd; uint32 mask, cookie, len; then char name[len]
_READ_BYTES = 64 * 1024  # one record is at most 16 + NAME_MAX + 1 bytes
_MAX_REARM_PASSES = 16  # directories appearing and vanishing while we arm: retry, bounded


@dataclass(frozen=True)
class RawEvent:
    """One `struct inotify_event`. `name` is empty for events about the watched object."""

    wd: int
    mask: int
    cookie: int
    name: str


def decode_events(buf: bytes) -> list[RawEvent]:
    """Decode the records one read() of an inotify descriptor returned.

    The kernel pads `name` with NULs to an alignment boundary and only ever returns whole
    records; a truncated tail (impossible from the kernel, possible from a caller) is
    dropped rather than misread.
    """
    events: list[RawEvent] = []
    offset = 0
    while offset + _HEADER.size <= len(buf):
        wd, mask, cookie, length = _HEADER.unpack_from(buf, offset)
        start = offset + _HEADER.size
        if start + length > len(buf):
            break
        raw_name = buf[start : start + length].split(b"\0", 1)[0]
        events.append(RawEvent(wd, mask, cookie, raw_name.decode("utf-8", "surrogateescape")))
        offset = start + length
    return events


def nearest_existing_dir(path: str) -> str:
    """The deepest existing directory on the way to `path` (path itself if it exists)."""
    current = path
    while not os.path.isdir(current):
        parent = posixpath.dirname(current)
        if parent == current:
            break
        current = parent
    return current


# --- libc ---------------------------------------------------------------------------------


class _Libc:
    def __init__(self) -> None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.init1 = lib.inotify_init1
        self.init1.argtypes = [ctypes.c_int]
        self.init1.restype = ctypes.c_int
        self.add_watch = lib.inotify_add_watch
        self.add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.add_watch.restype = ctypes.c_int
        self.rm_watch = lib.inotify_rm_watch
        self.rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        self.rm_watch.restype = ctypes.c_int


_libc: Optional[_Libc] = None


def _lib() -> _Libc:
    global _libc
    if _libc is None:
        _libc = _Libc()
    return _libc


def _oserror(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


def inotify_init() -> int:
    """A non-blocking, close-on-exec inotify descriptor. Raises SourceUnavailable with the
    limit to raise when the kernel refuses."""
    try:
        fd = int(_lib().init1(IN_NONBLOCK | IN_CLOEXEC))
    except (OSError, AttributeError) as err:  # no libc or a libc without inotify
        raise SourceUnavailable(f"inotify is not available: {err}") from None
    if fd >= 0:
        return fd
    code = ctypes.get_errno()
    if code == errno.EMFILE:
        reason = (
            "inotify instance limit reached: raise fs.inotify.max_user_instances "
            "(sysctl -w fs.inotify.max_user_instances=512)"
        )
    elif code == errno.ENFILE:
        reason = "system-wide open file limit reached (fs.file-max)"
    elif code == errno.ENOSYS:
        reason = "this kernel has no inotify (CONFIG_INOTIFY_USER)"
    else:
        reason = os.strerror(code)
    raise SourceUnavailable(f"cannot initialise inotify: {reason}")


def _watch_error_reason(path: str, err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return (
            f"cannot watch {path}: inotify watch limit reached, raise "
            "fs.inotify.max_user_watches (sysctl -w fs.inotify.max_user_watches=65536)"
        )
    if err.errno == errno.EACCES:
        return (
            f"cannot watch {path}: permission denied (run pgoom as root or as the data "
            "directory's owner)"
        )
    return f"cannot watch {path}: {os.strerror(err.errno or 0)}"


# --- the source ---------------------------------------------------------------------------


@dataclass
class _DataDir:
    path: str
    wd: Optional[int] = None  # watch on the directory itself; None while waiting for it
    generation: int = 0  # bumped whenever postmaster.pid is (re)created or removed
    done_generation: int = -1  # the generation already announced (or judged)


class InotifySource:
    name = "inotify"
    reports_forks = False

    def __init__(self, data_dirs: list[str], proc_root: str = "/proc") -> None:
        self.procfs = ProcFS(proc_root)
        self._dirs: dict[str, _DataDir] = {}
        for path in data_dirs:
            self._remember(path)
        self._fd: Optional[int] = None
        self._watches: dict[str, int] = {}  # watched path -> wd
        self._paths: dict[int, set[str]] = {}  # wd -> watched paths (symlinks may share one)
        self._warned: set[str] = set()
        self._stats = {
            "events": 0,
            "examines": 0,
            "rescans": 0,
            "rearms": 0,
            "overflows": 0,
        }

    # --- Source protocol -----------------------------------------------------------------

    def open(self) -> None:
        if self._fd is not None:
            return
        self._fd = inotify_init()
        try:
            self._rearm(strict=True, announce=False)
        except SourceUnavailable:
            self.close()
            raise
        # A postmaster.pid present now may be stale (postmaster SIGKILLed): the engine's
        # start-up scan covers running postmasters, so nothing is announced here. A later
        # write to the file (a crash-restart) is announced: only a live postmaster writes.
        for state in self._dirs.values():
            state.done_generation = -1

    def fileno(self) -> Optional[int]:
        return self._fd

    def timeout_s(self) -> Optional[float]:
        return None

    def read(self) -> list[Event]:
        out: list[Event] = []
        if self._fd is None:
            return out
        while True:
            try:
                buf = os.read(self._fd, _READ_BYTES)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            # The latency clock starts when pgoom learns of the write: right here.
            ts_ns = time.monotonic_ns()
            if not buf:
                break
            out.extend(self._handle(decode_events(buf), ts_ns))
        return out

    def add_data_dir(self, path: str) -> None:
        if self._remember(path) is None or self._fd is None:
            return
        # The engine adds the directory of a postmaster it has just examined: announcing
        # that postmaster again would be redundant, so arm without announcing.
        self._rearm(strict=False, announce=False)

    def stats(self) -> dict[str, int]:
        return {**self._stats, "watches": len(self._paths)}

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops every watch
        self._watches.clear()
        self._paths.clear()
        for state in self._dirs.values():
            state.wd = None

    # --- internals -----------------------------------------------------------------------

    def _remember(self, path: str) -> Optional[_DataDir]:
        norm = posixpath.normpath(path)
        if not norm.startswith("/") or norm in self._dirs:
            return None
        state = _DataDir(norm)
        self._dirs[norm] = state
        return state

    def _handle(self, events: list[RawEvent], ts_ns: int) -> list[Event]:
        out: list[Event] = []
        rearm = False
        for event in events:
            self._stats["events"] += 1
            if event.mask & IN_Q_OVERFLOW:
                # The kernel dropped events: every lock file may have changed unseen.
                self._stats["overflows"] += 1
                rearm = True
                for state in self._dirs.values():
                    state.generation += 1
                self._stats["rescans"] += 1
                out.append(Rescan("inotify queue overflow"))
                continue
            paths = self._paths.get(event.wd)
            if not paths:
                continue  # a watch we already dropped (its IN_IGNORED, late events)
            if event.mask & _WATCH_GONE:
                if event.mask & IN_IGNORED:
                    self._forget_wd(event.wd)
                rearm = True
                continue
            for path in paths:
                owner = self._dirs.get(path)
                if owner is not None and owner.wd == event.wd:
                    if event.name == PIDFILE:
                        out.extend(self._pidfile_event(owner, event.mask, ts_ns))
                    elif event.mask & IN_ISDIR and self._waiting():
                        rearm = True  # a data directory we wait for may live below this one
                else:
                    rearm = True  # an ancestor we wait on: a component may have appeared
        if rearm:
            out.extend(self._rearm(strict=False, ts_ns=ts_ns))
        return out

    def _waiting(self) -> bool:
        return any(state.wd is None for state in self._dirs.values())

    def _pidfile_event(self, state: _DataDir, mask: int, ts_ns: int) -> list[Event]:
        if mask & (_PIDFILE_NEW | _PIDFILE_GONE):
            state.generation += 1
        if mask & _PIDFILE_GONE:
            logger.debug("{}/{} removed (postmaster stopped)", state.path, PIDFILE)
            return []
        if not mask & _PIDFILE_CHANGED or state.done_generation == state.generation:
            return []
        return self._announce(state, ts_ns)

    def _announce(self, state: _DataDir, ts_ns: int) -> list[Event]:
        """Read postmaster.pid; once line 1 is complete, announce its PID once for this
        generation of the file."""
        path = posixpath.join(state.path, PIDFILE)
        try:
            text = read_file_text(path)
        except AccessDenied:
            state.done_generation = state.generation
            return self._rescan(f"{path} changed but is unreadable")
        if text is None:
            return []
        pidfile = parse_postmaster_pid(text)
        if pidfile is None:
            return []  # empty or half-written: the next IN_MODIFY comes back here
        state.done_generation = state.generation
        if not self.procfs.exists(pidfile.pid):
            # Written just now by a process we cannot see: the postmaster lives in another
            # PID namespace and the file holds its namespace-local PID. Scan instead.
            return self._rescan(f"{path} names pid {pidfile.pid}, which is not visible here")
        self._stats["examines"] += 1
        return [Examine(pidfile.pid, ts_ns)]

    def _rescan(self, reason: str) -> list[Event]:
        self._stats["rescans"] += 1
        return [Rescan(reason)]

    def _forget_wd(self, wd: int) -> None:
        for path in self._paths.pop(wd, set()):
            if self._watches.get(path) == wd:
                del self._watches[path]
            state = self._dirs.get(path)
            if state is not None and state.wd == wd:
                self._lost(state)

    @staticmethod
    def _lost(state: _DataDir) -> None:
        logger.info("data directory {} is gone; waiting for it to reappear", state.path)
        state.wd = None
        state.generation += 1

    def _add_watch(self, path: str, mask: int) -> int:
        assert self._fd is not None
        wd = int(_lib().add_watch(self._fd, os.fsencode(path), mask | IN_MASK_ADD))
        if wd < 0:
            raise _oserror(f"inotify_add_watch {path}")
        return wd

    def _drop_path(self, path: str) -> None:
        """Stop watching `path`; remove the kernel watch when no other path shares it."""
        wd = self._watches.pop(path, None)
        if wd is None:
            return
        paths = self._paths.get(wd)
        if paths is not None:
            paths.discard(path)
            if not paths:
                del self._paths[wd]
                assert self._fd is not None
                # EINVAL when the kernel already dropped it (directory deleted): fine.
                _lib().rm_watch(self._fd, wd)

    def _desired(self) -> dict[str, tuple[int, list[_DataDir]]]:
        """Which path to watch with which mask, for each data directory's current state."""
        want: dict[str, tuple[int, list[_DataDir]]] = {}
        for state in self._dirs.values():
            target = nearest_existing_dir(state.path)
            mask = DATA_DIR_MASK if target == state.path else ANCESTOR_MASK
            old_mask, owners = want.get(target, (0, []))
            want[target] = (old_mask | mask, [*owners, state] if target == state.path else owners)
        return want

    def _rearm(self, strict: bool, announce: bool = True, ts_ns: int = 0) -> list[Event]:
        """Bring the watches in line with the file system: each data directory watched
        itself when it exists, else its nearest existing ancestor. Idempotent (re-adding a
        watch on the same inode returns the same wd). Announces a postmaster.pid found in a
        directory that just became watched: it may have been written before the watch."""
        if self._fd is None:
            return []
        self._stats["rearms"] += 1
        newly_armed: dict[str, _DataDir] = {}
        for _ in range(_MAX_REARM_PASSES):
            want = self._desired()
            raced = False
            for path, (mask, owners) in want.items():
                try:
                    wd = self._add_watch(path, mask)
                except OSError as err:
                    if err.errno in (errno.ENOENT, errno.ENOTDIR):
                        raced = True  # vanished between the stat and the watch
                        continue
                    reason = _watch_error_reason(path, err)
                    if strict:
                        raise SourceUnavailable(reason) from None
                    if reason not in self._warned:
                        self._warned.add(reason)
                        logger.warning("inotify: {}", reason)
                    continue
                old = self._watches.get(path)
                if old != wd:
                    if old is not None:
                        self._drop_path(path)  # the path now names another inode
                    self._watches[path] = wd
                    self._paths.setdefault(wd, set()).add(path)
                for state in owners:
                    if state.wd != wd:
                        state.wd = wd
                        newly_armed[state.path] = state
            for path in [p for p in self._watches if p not in want]:
                self._drop_path(path)
            for state in self._dirs.values():
                if state.wd is not None and self._watches.get(state.path) != state.wd:
                    self._lost(state)
            if not raced:
                break
        out: list[Event] = []
        if not announce:
            return out  # open(): the engine's start-up scan covers what exists now
        for state in newly_armed.values():
            if state.wd is None:
                continue
            logger.info("watching data directory {}", state.path)
            state.generation += 1
            out.extend(self._announce(state, ts_ns or time.monotonic_ns()))
        return out
