"""A real `pgoom watch` under a real notify socket, as systemd runs a Type=notify unit:
READY=1 only once subscribed and the first scan is done, STATUS as postmasters come,
STOPPING=1 on SIGTERM."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.pg import Cluster, read_score, wait_for
from tests.support.watcher import Watcher
from watcher.limits import EXIT_SOURCE_UNAVAILABLE

pytestmark = pytest.mark.root


class NotifySocket:
    """The manager's end: a bound AF_UNIX datagram socket, path or abstract."""

    def __init__(self, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.directory = ""
        if abstract:
            name = f"pgoom-test/{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            self.directory = tempfile.mkdtemp(prefix="pgoom-notify-")
            path = os.path.join(self.directory, "notify")
            self.sock.bind(path)
            self.env_value = path

    def receive(self, timeout_s: float = 15) -> dict[str, str]:
        self.sock.settimeout(timeout_s)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def receive_until(self, key: str, timeout_s: float = 15) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while True:
            fields = self.receive(max(0.01, deadline - time.monotonic()))
            if key in fields:
                return fields

    def close(self) -> None:
        self.sock.close()
        if self.directory:
            os.unlink(os.path.join(self.directory, "notify"))
            os.rmdir(self.directory)


@pytest.fixture(params=["path", "abstract"])
def notify(request: pytest.FixtureRequest) -> Iterator[NotifySocket]:
    sock = NotifySocket(abstract=request.param == "abstract")
    yield sock
    sock.close()


def test_ready_after_the_first_scan_then_status_then_stopping(
    notify: NotifySocket, make_cluster: Callable[..., Cluster]
) -> None:
    tag = uuid.uuid4().hex[:8]
    early = make_cluster(name=f"notify-early-{tag}")
    late = make_cluster(name=f"notify-late-{tag}")
    early_pid = early.start()
    assert read_score(early_pid) == 1000
    patterns = [f"postgres -D {re.escape(c.data_dir)}( |$)" for c in (early, late)]
    watcher = Watcher(
        "--config",
        "",
        "--no-fallback",
        "--source",
        "netlink",
        "--score",
        "0",
        "--pattern",
        patterns[0],
        "--pattern",
        patterns[1],
        env={"NOTIFY_SOCKET": notify.env_value},
    )
    try:
        ready = notify.receive_until("READY")
        # READY=1 comes after the first scan: the postmaster that was already running is
        # protected by then, and the status says so.
        assert ready["READY"] == "1"
        assert read_score(early_pid) == 0
        assert ready["STATUS"] == "watching with source netlink; 1 postmaster(s) protected"
        assert ready["MAINPID"] == str(watcher.proc.pid)

        late_pid = late.start()
        wait_for(lambda: read_score(late_pid) == 0, 10, what="late postmaster protected")
        status = notify.receive_until("STATUS")
        assert status["STATUS"] == "watching with source netlink; 2 postmaster(s) protected"

        os.kill(watcher.proc.pid, signal.SIGTERM)
        assert notify.receive_until("STOPPING")["STOPPING"] == "1"
        assert watcher.proc.wait(timeout=10) == 0
    finally:
        watcher.stop()


def test_no_ready_when_startup_fails(notify: NotifySocket) -> None:
    """In a new PID namespace the proc connector never acknowledges: `--source netlink`
    exits 6 with a STATUS saying why, and never says READY=1 (systemd then marks the start
    failed instead of waiting for it)."""
    watcher = Watcher(
        "--config",
        "",
        "--source",
        "netlink",
        env={"NOTIFY_SOCKET": notify.env_value},
        prefix=["unshare", "--pid", "--fork", "--mount-proc"],
    )
    assert watcher.proc.wait(timeout=30) == EXIT_SOURCE_UNAVAILABLE, watcher.text()
    received = []
    notify.sock.setblocking(False)
    try:
        while True:
            received.append(notify.sock.recv(4096).decode())
    except BlockingIOError:
        pass
    assert not any("READY=1" in r for r in received), received
    assert any(r.startswith("STATUS=failed: ") for r in received), received
    assert any("STOPPING=1" in r for r in received), received


def test_the_unit_file_verifies_clean(tmp_path: Path) -> None:
    """`systemd-analyze verify` on deploy/systemd/pgoom.service, with ExecStart pointed at
    this checkout's pgoom (the unit names the installed path) and without the man-page
    lookup (pgoom(1) is not installed here)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    assert analyze is not None
    root = Path(__file__).resolve().parents[2]
    pgoom = Path(sys.executable).with_name("pgoom")
    if not pgoom.exists():
        pytest.skip(f"{pgoom} is not installed (pip install -e .)")
    text = (root / "deploy/systemd/pgoom.service").read_text()
    assert "ExecStart=/opt/pgoom/bin/pgoom " in text
    unit = tmp_path / "pgoom.service"
    unit.write_text(text.replace("/opt/pgoom/bin/pgoom", str(pgoom)))
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
