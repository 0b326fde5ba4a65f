"""Run `pgoom` as a real subprocess, read its log, stop it by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from typing import Optional

from tests.support.pg import wait_for

PGOOM = [sys.executable, "-m", "watcher"]


class Watcher:
    def __init__(
        self, *args: str, env: Optional[dict[str, str]] = None, prefix: Optional[list[str]] = None
    ) -> None:
        self.log_dir = tempfile.mkdtemp(prefix="pgoom-watch-")
        self.log_file = os.path.join(self.log_dir, "pgoom.log")
        self.stderr_path = os.path.join(self.log_dir, "stderr")
        full_env = {**os.environ, **(env or {})}
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*(prefix or []), *PGOOM, "watch", "--log-file", self.log_file, *args],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=full_env,
            )

    def text(self) -> str:
        try:
            with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_for_log(self, needle: str, timeout_s: float = 15) -> str:
        def found() -> bool:
            if self.proc.poll() is not None and needle not in self.text():
                raise AssertionError(f"pgoom exited {self.proc.returncode}:\n{self.text()}")
            return needle in self.text()

        wait_for(found, timeout_s, 0.02, what=f"log line {needle!r}")
        return self.text()

    def wait_ready(self, timeout_s: float = 15) -> str:
        return self.wait_for_log("watching with source", timeout_s)

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
