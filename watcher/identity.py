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
from collections.abc import Collection
from typing import Optional

from watcher.binary import judge
from watcher.errors import AccessDenied, ProcessGone
from watcher.match import Facts
from watcher.parse import (
    PIDFILE_MAX_BYTES,
    POSTGRES_BINARIES,
    Stat,
    binary_name,
    conf_data_directory,
    data_dir_from_argv,
    environ_value,
    names_single_user_backend,
    parse_postmaster_pid,
    status_all_uids,
    status_fields,
    strip_deleted,
)
from watcher.procfs import ProcFS, read_file_text

_MAX_SYMLINKS = 40  # as the kernel's MAXSYMLINKS: beyond it, ELOOP


def inspect(
    procfs: ProcFS,
    pid: int,
    stat: Optional[Stat] = None,
    argv: Optional[list[str]] = None,
    trusted_binaries: Collection[str] = (),
) -> Facts:
    """Read everything confirm() needs. Raises ProcessGone if the process vanished."""
    if stat is None:
        stat = procfs.stat(pid)
    if argv is None:
        argv = procfs.cmdline(pid)
    status = status_fields(procfs.read_text(pid, "status"), "Uid", "NSpid")
    uids = status_all_uids(status)
    ns_pid = _innermost_ns_pid(status, pid)

    try:
        exe: Optional[str] = strip_deleted(procfs.exe(pid))
    except AccessDenied:
        exe = None
    binary = binary_name(exe) if exe is not None else None
    executable = (
        judge(procfs.path(pid, "exe"), procfs.path(pid, "root"), exe, trusted_binaries)
        if exe is not None and binary in POSTGRES_BINARIES
        else None
    )

    data_dir, located = _data_dir(procfs, pid, argv)
    data_dir_uid: Optional[int] = None
    pidfile = None
    pidfile_state = "missing"
    names_live = False
    if located is not None:
        access, data_dir_uid = located
        try:
            text = read_file_text(posixpath.join(access, "postmaster.pid"), PIDFILE_MAX_BYTES)
        except AccessDenied:
            pidfile_state = "unreadable"
        else:
            pidfile = parse_postmaster_pid(text) if text is not None else None
            if pidfile is not None:
                pidfile_state = "ok"
                if pidfile.pid != ns_pid:
                    names_live = _is_live_postgres(procfs, pidfile.pid, pid, ns_pid)
            elif text is not None and names_single_user_backend(text):
                pidfile_state = "single-user"
    # The lock file holds the PID as the postmaster's own namespace numbers it.
    if pidfile is not None and pidfile.pid == ns_pid and ns_pid != pid:
        pidfile = pidfile.__class__(pid, pidfile.data_dir, pidfile.start_epoch, pidfile.port)
    return Facts(
        stat=stat,
        argv=argv,
        uid=uids[0],
        uids_agree=len(set(uids)) == 1,
        binary=binary,
        binary_is_server=executable.server if executable is not None else None,
        binary_trusted=executable.trusted if executable is not None else None,
        binary_distrust=executable.reason if executable is not None else "",
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
    """The data directory the process will lock, resolved (no '..', no symlinks) as the
    process sees it, and where this process reaches it. Rules are decided on the resolved
    path: `-D /pgdata/pg/../../tmp/evil` is /tmp/evil, whatever its spelling."""
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
        return _at_cwd(procfs, pid, cwd)
    if not data_dir.startswith("/"):
        try:
            cwd = procfs.cwd(pid)
        except AccessDenied:
            return None, None
        joined = posixpath.join(cwd, data_dir)
        if _locate(procfs, pid, joined)[1] is None:
            # After start-up the postmaster has already changed into its data directory.
            return _at_cwd(procfs, pid, cwd)
        data_dir = joined
    return _through_config_dir(procfs, pid, data_dir)


def _at_cwd(procfs: ProcFS, pid: int, cwd: str) -> tuple[str, Optional[Located]]:
    """The working directory as the data directory: the kernel names the link's target
    already resolved, and the link itself reaches the very directory in any namespace."""
    here = procfs.path(pid, "cwd")
    try:
        info = os.stat(here)
    except OSError:
        return cwd, None
    return cwd, (here, info.st_uid) if stat_module.S_ISDIR(info.st_mode) else None


def _through_config_dir(procfs: ProcFS, pid: int, named: str) -> tuple[str, Optional[Located]]:
    """`-D` may name a configuration directory whose postgresql.conf sets data_directory
    (Debian keeps configuration in /etc/postgresql/<v>/<name>). A data directory holds
    PG_VERSION; a configuration directory does not."""
    directory, located = _locate(procfs, pid, named)
    if located is None or os.path.exists(posixpath.join(located[0], "PG_VERSION")):
        return directory, located
    try:
        text = read_file_text(posixpath.join(located[0], "postgresql.conf"))
    except AccessDenied:
        text = None
    target = conf_data_directory(text) if text is not None else None
    if target is None:
        return directory, located
    return _locate(procfs, pid, posixpath.join(directory, target))


def _locate(procfs: ProcFS, pid: int, directory: str) -> tuple[str, Optional[Located]]:
    """`directory` resolved inside the process's root (/proc/<pid>/root, which crosses
    mount namespaces), and the directory's owner. Only where that root is out of reach (a
    sidecar without CAP_SYS_PTRACE) is the path taken as this process sees it: a pod's
    shared volume is mounted at the same path. A path that does not resolve to a directory
    (a file, a dangling link, a loop) is not located."""
    root = procfs.path(pid, "root")
    try:
        os.lstat(root + "/")
    except PermissionError:
        root = ""
    except OSError:
        return posixpath.normpath(directory), None
    resolved = resolve_in_root(root, directory)
    if resolved is None:
        return posixpath.normpath(directory), None
    access = root + resolved if root else resolved
    try:
        info = os.lstat(access)
    except OSError:
        return resolved, None
    if not stat_module.S_ISDIR(info.st_mode):
        return resolved, None
    return resolved, (access, info.st_uid)


def resolve_in_root(root: str, path: str) -> Optional[str]:
    """`path` with '.', '..' and symlinks resolved as a process whose root directory is
    `root` resolves them (absolute link targets start again at `root`, '..' stops there);
    None if a component is missing or the links loop. os.path.realpath would resolve an
    absolute link inside a container against the host's root."""
    pending = [part for part in reversed(path.split("/")) if part]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = "/" + "/".join([*resolved, part])
        try:
            info = os.lstat(root + candidate)
        except OSError:
            return None
        if stat_module.S_ISLNK(info.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                return None
            try:
                target = os.readlink(root + candidate)
            except OSError:
                return None
            if target.startswith("/"):
                resolved = []
            pending.extend(p for p in reversed(target.split("/")) if p)
            continue
        resolved.append(part)
    return "/" + "/".join(resolved)


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
