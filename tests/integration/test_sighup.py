"""SIGHUP does what daemons do (issue 9, item 10): on main it killed the watcher (exit 129,
no "stopped" line, nothing protected until a restart). Now it reopens the log file that
logrotate moved away and re-reads the configuration file, saying what changed; and a
broken stderr (SIGPIPE, EPIPE) costs log lines, not protection."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Callable

import pytest

from tests.support.pg import Cluster, read_score, wait_for
from tests.support.watcher import PGOOM, Watcher

pytestmark = pytest.mark.root


def write_config(path: str, cluster: Cluster, score: int) -> None:
    with open(path, "w") as f:
        f.write(f"[[rule]]\npattern = '^{re.escape(f'postgres -D {cluster.data_dir}')}$'\n")
        f.write(f"score = {score}\n")
    os.chmod(path, 0o644)  # root's, not writable by others: pgoom refuses it otherwise


def test_sighup_reopens_the_log_and_applies_the_rereaded_configuration(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster()
    pm = cluster.start()
    config = os.path.join(tempfile.mkdtemp(prefix="pgoom-hup-"), "pgoom.toml")
    write_config(config, cluster, 500)
    watcher = Watcher("--config", config, "--source", "netlink", "--no-fallback")
    try:
        watcher.wait_ready()
        wait_for(lambda: read_score(pm) == 500, 10, what="the postmaster at 500")
        # logrotate: move the file away, then SIGHUP.
        rotated = watcher.log_file + ".1"
        os.rename(watcher.log_file, rotated)
        write_config(config, cluster, 0)
        os.kill(watcher.proc.pid, signal.SIGHUP)
        text = watcher.wait_for_log("SIGHUP: configuration changed")
        assert watcher.proc.poll() is None, text
        assert "SIGHUP: log file reopened" in text
        wait_for(lambda: read_score(pm) == 0, 10, what="the new score applied")
        wait_for(lambda: os.path.exists(watcher.log_file), 5, what="a new log file")
        with open(watcher.log_file) as f:
            assert "SIGHUP: configuration changed" in f.read()
        # A file that no longer parses keeps the running configuration.
        with open(config, "w") as f:
            f.write("scor = 1\n")
        os.kill(watcher.proc.pid, signal.SIGHUP)
        watcher.wait_for_log("configuration not re-read, keeping the running one")
        assert watcher.proc.poll() is None
    finally:
        assert watcher.stop() == 0
    assert "stopped" in watcher.text()


def test_a_closed_stderr_pipe_costs_log_lines_not_protection(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster()
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to stderr: EPIPE (SIGPIPE is ignored by Python)
    proc = subprocess.Popen(
        [
            *PGOOM,
            "watch",
            "--log-file",
            "",
            "--source",
            "netlink",
            "--score",
            "0",
            "--no-fallback",
            "--pattern",
            "^" + re.escape(f"postgres -D {cluster.data_dir}") + "$",
        ],
        stdout=subprocess.DEVNULL,
        stderr=write_end,
    )
    os.close(write_end)
    try:
        # No log to wait for: the postmaster's score is the proof the watcher runs.
        wait_for(lambda: proc.poll() is not None or _netlink_listening(proc.pid), 15)
        assert proc.poll() is None
        pm = cluster.start()
        wait_for(lambda: read_score(pm) == 0, 15, what="the postmaster protected")
        assert proc.poll() is None
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def _netlink_listening(pid: int) -> bool:
    """The watcher has its proc connector socket open: it is past start-up."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return sum(link.startswith("socket:") for link in links) >= 3
