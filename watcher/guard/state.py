"""The guard's state where `pgoom status` can read it: one small JSON file per watcher in
/run/pgoom, rewritten (atomically) when a guard starts or stops, changes state or acts.

Written by root in a directory root owns: the directory is created 0755 if missing and used
only if it is owned by this uid and not writable by others; files are created O_EXCL and
renamed into place, so nobody else's file or link is ever written through. Readers skip
files whose writer is gone (a watcher killed by SIGKILL leaves its file behind).
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any, Optional

from loguru import logger

STATE_DIR = "/run/pgoom"
_MAX_BYTES = 1 << 20


def state_path(directory: str = STATE_DIR, pid: Optional[int] = None) -> str:
    return f"{directory}/guard-{os.getpid() if pid is None else pid}.json"


def _usable_dir(directory: str) -> bool:
    try:
        os.mkdir(directory, 0o755)
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        info = os.lstat(directory)
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def write_state(rows: list[dict[str, Any]], directory: str = STATE_DIR) -> bool:
    """Publish `rows` (watcher.guard.Guard.status() of each postmaster); False if the
    directory cannot be used (the guard works the same, status just cannot show it)."""
    if not _usable_dir(directory):
        return False
    final = state_path(directory)
    temp = f"{final}.tmp"
    data = json.dumps({"pid": os.getpid(), "postmasters": rows}, default=str).encode()
    try:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        fd = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(temp, final)
    except OSError as err:
        logger.debug("guard: cannot write {}: {}", final, err)
        return False
    return True


def remove_state(directory: str = STATE_DIR) -> None:
    try:
        os.unlink(state_path(directory))
    except OSError:
        pass


def read_states(directory: str = STATE_DIR) -> dict[int, dict[str, Any]]:
    """postmaster pid -> its guard's status, from every live watcher's file."""
    found: dict[int, dict[str, Any]] = {}
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return found
    for name in names:
        if not (name.startswith("guard-") and name.endswith(".json")):
            continue
        writer = name[len("guard-") : -len(".json")]
        if not writer.isdigit() or not os.path.exists(f"/proc/{writer}"):
            continue
        try:
            fd = os.open(
                f"{directory}/{name}", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            )
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                doc = json.loads(os.read(fd, _MAX_BYTES))
            finally:
                os.close(fd)
        except (OSError, ValueError):
            continue
        for row in doc.get("postmasters", []) if isinstance(doc, dict) else []:
            if isinstance(row, dict) and isinstance(row.get("postmaster"), int):
                found[row["postmaster"]] = row
    return found
