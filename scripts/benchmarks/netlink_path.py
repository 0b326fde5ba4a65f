#!/usr/bin/env python3
"""Where the netlink exec -> protected time goes, step by step, in one process.

A NetlinkSource and an Engine run in this process; for each real postmaster start the
engine's examine() of its exec event is timed, with every /proc access and the identity and
adjustment steps timed inside it. Run at SCHED_FIFO so that other tasks do not delay it:

    chrt -f 1 .venv/bin/python scripts/benchmarks/netlink_path.py --starts 10     # root
"""

from __future__ import annotations

import argparse
import os
import re
import select
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from loguru import logger  # noqa: E402

import watcher.adjust  # noqa: E402
import watcher.discover  # noqa: E402
import watcher.engine  # noqa: E402
import watcher.identity  # noqa: E402
from tests.support.pg import Cluster, Template  # noqa: E402
from watcher.config import make_settings  # noqa: E402
from watcher.procfs import ProcFS  # noqa: E402
from watcher.sources.base import Examine  # noqa: E402
from watcher.sources.netlink import NetlinkSource  # noqa: E402

steps: list[tuple[str, int]] = []


def timed(owner: Any, name: str, label: Callable[[tuple[Any, ...]], str]) -> None:
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter_ns()
        try:
            return original(*args, **kwargs)
        finally:
            steps.append((label(args), (time.perf_counter_ns() - t0) // 1000))

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=int, default=10)
    args = parser.parse_args()
    logger.remove()
    timed(ProcFS, "read_bytes", lambda a: str(a[2]))
    timed(ProcFS, "readlink", lambda a: f"link:{a[2]}")
    timed(ProcFS, "write_oom_score_adj", lambda a: "write")
    timed(watcher.identity, "is_postgres_server", lambda a: "exe-content")
    timed(watcher.identity, "read_file_text", lambda a: "postmaster.pid")
    timed(watcher.discover, "inspect", lambda a: "INSPECT")
    timed(watcher.adjust.Adjuster, "set_score", lambda a: "SET_SCORE")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    template = Template()
    cluster = Cluster(template)
    pattern = re.escape(f"postgres -D {cluster.data_dir}") + "(?: |$)"
    settings = make_settings(
        patterns=[pattern], data_dirs=[cluster.data_dir], score=13, log_file=None
    )
    source = NetlinkSource(rcvbuf_bytes=32 << 20, ack_timeout_s=0.5)
    source.open()
    engine = watcher.engine.Engine(settings, source)
    try:
        for _ in range(args.starts):
            pm = cluster.start(wait=False)
            found = False
            while not found:
                select.select([source.fileno()], [], [], 5)
                for event in source.read():
                    if isinstance(event, Examine) and event.pid == pm:
                        steps.clear()
                        t0 = time.monotonic_ns()
                        engine.examine(event.pid, event.ts_ns)
                        t1 = time.monotonic_ns()
                        detail = " ".join(f"{name}={us}" for name, us in steps)
                        print(
                            f"event read {(t0 - event.ts_ns) // 1000} us after exec, "
                            f"examine {(t1 - t0) // 1000} us: {detail}"
                        )
                        found = True
            cluster.wait_ready()
            cluster.stop()
    finally:
        source.close()
        cluster.destroy()
        template.cleanup()


if __name__ == "__main__":
    main()
