"""What an event loop does with watcher.guard.Guards, in a thread: one fd in an epoll, one
deadline, and a count of wakeups (for the idle figure). Used by the integration tests and
scripts/benchmarks/guard.py, which drive the guard in-process on a real memory cgroup."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable, Optional

from scripts.oomharness.cgroup import MemoryCgroup
from watcher.guard import Guards


class GuardLoop:
    def __init__(self, guards: Guards) -> None:
        self.guards = guards
        self.actions: list[dict[str, Any]] = []
        self.on_action: Optional[Callable[[dict[str, Any]], None]] = None  # bench: timestamps
        self.wakeups = 0
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.epoll()
        poller.register(self.guards.fileno(), select.EPOLLIN)
        poller.register(self._stop_r, select.EPOLLIN)
        try:
            while True:
                deadline = self.guards.deadline_s()
                timeout = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
                ready = [fd for fd, _ in poller.poll(timeout)]
                if self._stop_r in ready:
                    break
                self.wakeups += 1
                if self.guards.fileno() in ready:
                    self.guards.on_ready()
                self.guards.on_timer()
        finally:
            poller.close()

    def cpu_s(self) -> float:
        """CPU time the loop's thread has used so far (user + system): the guard's cost."""
        ident = self._thread.ident
        assert ident is not None and self._thread.is_alive()
        return time.clock_gettime(time.pthread_getcpuclockid(ident))

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(10)
        os.close(self._stop_r)
        os.close(self._stop_w)


def v1_memcg(limit_bytes: int, prefix: str) -> Iterator[MemoryCgroup]:
    """A fresh cgroup v1 memory cgroup for a guard test, removed after it; the test is
    skipped on cgroup v2 (the VM test bed's guest runs the v2 side)."""
    import pytest

    group = MemoryCgroup(limit_bytes, prefix=prefix)
    if group.version != 1:
        group.remove()
        pytest.skip("cgroup v1 here; cgroup v2 runs in the VM test bed")
    yield group
    group.remove()
