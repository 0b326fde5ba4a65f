"""Fixtures shared by the integration tests."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture
def sleeper() -> Iterator[int]:
    """A live process of our own (its PID stands in for another process in the tests)."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def work() -> Iterator[str]:
    """A scratch directory `pgoom exec`'s CMD (uid 26) may write to."""
    path = tempfile.mkdtemp(prefix="pgoom-exec-")
    os.chmod(path, 0o777)
    yield path
    subprocess.run(["rm", "-rf", path], check=False)
