"""Gather the facts that confirm a postmaster (watcher.match.confirm decides).

Reads through /proc/<pid>/root and /proc/<pid>/cwd where it may, so that a watcher on the
host sees a container's data directory as the postmaster does. Where ptrace access is
missing (a sidecar without CAP_SYS_PTRACE), it falls back to the path as this process sees
it: a pod's shared volume is mounted at the same path.
"""

from __future__ import annotations

import os
import posixpath
import stat as stat_module
from typing import Optional

from watcher.binary import is_postgres_server
from watcher.errors import AccessDenied, ProcessGone
from watcher.match import Facts
from watcher.parse import (
    POSTGRES_BINARIES,
    Stat,
    binary_name,
    conf_data_directory,
    data_dir_from_argv,
    environ_value,
    parse_postmaster_pid,
    status_fields,
    status_uids,
)
from watcher.procfs import ProcFS, read_file_text


def inspect(
    procfs: ProcFS, pid: int, stat: Optional[Stat] = None, argv: Optional[list[str]] = None
) -> Facts:
    """Read everything confirm() needs. Raises ProcessGone if the process vanished."""
    if stat is None:
        stat = procfs.stat(pid)
    if argv is None:
        argv = procfs.cmdline(pid)
    status = status_fields(procfs.read_text(pid, "status"), "Uid", "NSpid")
    uid, _ = status_uids(status)
    ns_pid = _innermost_ns_pid(status, pid)

    try:
        binary: Optional[str] = binary_name(procfs.exe(pid))
    except AccessDenied:
        binary = None
    is_server = is_postgres_server(procfs.path(pid, "exe")) if binary in POSTGRES_BINARIES else None

    data_dir, located = _data_dir(procfs, pid, argv)
    data_dir_uid: Optional[int] = None
    pidfile = None
    pidfile_state = "missing"
    names_live = False
    if located is not None:
        access, data_dir_uid = located
        try:
            text = read_file_text(posixpath.join(access, "postmaster.pid"))
        except AccessDenied:
            pidfile_state = "unreadable"
        else:
            pidfile = parse_postmaster_pid(text) if text is not None else None
            if pidfile is not None:
                pidfile_state = "ok"
                if pidfile.pid != ns_pid:
                    names_live = _is_live_postgres(procfs, pidfile.pid, pid, ns_pid)
    # The lock file holds the PID as the postmaster's own namespace numbers it.
    if pidfile is not None and pidfile.pid == ns_pid and ns_pid != pid:
        pidfile = pidfile.__class__(pid, pidfile.data_dir, pidfile.start_epoch, pidfile.port)
    return Facts(
        stat=stat,
        argv=argv,
        uid=uid,
        binary=binary,
        binary_is_server=is_server,
        data_dir=data_dir,
        data_dir_uid=data_dir_uid,
        pidfile=pidfile,
        pidfile_state=pidfile_state,
        pidfile_names_live_postgres=names_live,
    )


def _innermost_ns_pid(status: dict[str, str], pid: int) -> int:
    ns = status.get("NSpid", "").split()
    return int(ns[-1]) if ns else pid


Located = tuple[str, int]  # (path this process can open, owner uid)


def _data_dir(procfs: ProcFS, pid: int, argv: list[str]) -> tuple[Optional[str], Optional[Located]]:
    """The data directory as the process names it, and where this process reaches it."""
    data_dir = data_dir_from_argv(argv)
    if data_dir is None:
        try:
            data_dir = environ_value(procfs.environ(pid), "PGDATA")
        except AccessDenied:
            data_dir = None
    if data_dir is None:
        # A running postmaster's working directory is its data directory.
        try:
            cwd = procfs.cwd(pid)
        except AccessDenied:
            return None, None
        if not os.path.exists(posixpath.join(procfs.path(pid, "cwd"), "postmaster.pid")):
            return None, None
        return cwd, _locate(procfs, pid, cwd)
    if not data_dir.startswith("/"):
        try:
            cwd = procfs.cwd(pid)
        except AccessDenied:
            return None, None
        joined = posixpath.normpath(posixpath.join(cwd, data_dir))
        # After start-up the postmaster has already changed into its data directory.
        data_dir = joined if os.path.isdir(procfs.in_process_root(pid, joined)) else cwd
    return _through_config_dir(procfs, pid, posixpath.normpath(data_dir))


def _through_config_dir(procfs: ProcFS, pid: int, directory: str) -> tuple[str, Optional[Located]]:
    """`-D` may name a configuration directory whose postgresql.conf sets data_directory
    (Debian keeps configuration in /etc/postgresql/<v>/<name>). A data directory holds
    PG_VERSION; a configuration directory does not."""
    located = _locate(procfs, pid, directory)
    if located is None or os.path.exists(posixpath.join(located[0], "PG_VERSION")):
        return directory, located
    try:
        text = read_file_text(posixpath.join(located[0], "postgresql.conf"))
    except AccessDenied:
        text = None
    target = conf_data_directory(text) if text is not None else None
    if target is None:
        return directory, located
    data_dir = posixpath.normpath(posixpath.join(directory, target))
    return data_dir, _locate(procfs, pid, data_dir)


def _locate(procfs: ProcFS, pid: int, directory: str) -> Optional[Located]:
    """Reach `directory` through /proc/<pid>/root (the process's mount namespace) where
    ptrace access allows, else by its path here (a pod's shared volume). One stat gives both
    "is a directory" and its owner."""
    for candidate in (procfs.in_process_root(pid, directory), directory):
        try:
            info = os.stat(candidate)
        except OSError:
            continue
        if stat_module.S_ISDIR(info.st_mode):
            return candidate, info.st_uid
    return None


def _is_live_postgres(procfs: ProcFS, other: int, pid: int, ns_pid: int) -> bool:
    """Does the PID in a postmaster.pid that is not ours name a running postgres process?"""
    if ns_pid == pid:
        try:
            stat = procfs.stat(other)
        except (ProcessGone, AccessDenied):
            return False
        return stat.comm in POSTGRES_BINARIES and stat.state not in ("Z", "X")
    # In a nested PID namespace the file's PID is namespace-local: find the process that
    # carries it in the same namespace.
    try:
        own_ns = procfs.readlink(pid, "ns/pid")
    except (OSError, ProcessGone, AccessDenied):
        return True  # cannot tell: assume the lock is held, never protect a second postmaster
    for candidate in procfs.pids():
        try:
            status = procfs.status(candidate)
            if _innermost_ns_pid(status, candidate) != other:
                continue
            if procfs.readlink(candidate, "ns/pid") != own_ns:
                continue
            return status.get("Name") in POSTGRES_BINARIES
        except (OSError, ProcessGone, AccessDenied):
            continue
    return False
