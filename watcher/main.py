"""Console entry point.

`pgoom exec` is the container entrypoint and sits on the database's start path, so it is
dispatched before typer, loguru, psutil or pyroute2 are imported: those cost tens of
milliseconds and megabytes that the exec path does not need.
"""

from __future__ import annotations

import os
import sys


def open_standard_fds() -> None:
    """Give a closed stdin, stdout or stderr /dev/null, as daemons do. Closed, the next file
    opened takes its number: pgoom's log or netlink socket, CMD's postmaster.pid, would then
    receive whatever is written to "stderr"; and Python starts with sys.stderr None, on
    which every print and flush fails."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        try:
            opened = os.open("/dev/null", os.O_RDWR)
        except OSError:
            continue  # no /dev/null (a bare chroot): leave it closed, writes are guarded
        if opened != fd:
            os.dup2(opened, fd)
            os.close(opened)
        if getattr(sys, name) is None:
            mode = "r" if fd == 0 else "w"
            setattr(sys, name, open(fd, mode, closefd=False, encoding="utf-8"))


def main() -> None:
    open_standard_fds()
    if sys.argv[1:2] == ["exec"]:
        from watcher.exec.entrypoint import main as exec_main

        sys.exit(exec_main(sys.argv[2:]))
    from watcher.cli import run

    run()
