"""Console entry point.

`pgoom exec` is the container entrypoint and sits on the database's start path, so it is
dispatched before typer, loguru, psutil or pyroute2 are imported: those cost tens of
milliseconds and megabytes that the exec path does not need.
"""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["exec"]:
        from watcher.exec.entrypoint import main as exec_main

        sys.exit(exec_main(sys.argv[2:]))
    from watcher.cli import run

    run()
