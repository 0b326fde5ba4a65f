"""The netlink (proc connector) source on the real kernel, with real PostgreSQL 15."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.pg import Cluster, children_of, children_settled_at, read_score, wait_for
from tests.support.watcher import PGOOM, Watcher
from watcher.sources.base import Examine, Forked, Rescan
from watcher.sources.netlink import NetlinkSource, decode, kernel_filters_events

pytestmark = pytest.mark.root

MakeCluster = Callable[..., Cluster]

# A fork/exec storm: each process spawns /bin/true `n` times (vfork-based posix_spawn, the
# cheapest exec Python has), one exec event each.
STORM = (
    "import os, sys\n"
    "for _ in range(int(sys.argv[1])):\n"
    "    os.waitpid(os.posix_spawn('/bin/true', ['true'], {}), 0)\n"
)


@pytest.fixture
def source() -> Iterator[NetlinkSource]:
    src = NetlinkSource(rcvbuf_bytes=1 << 20, ack_timeout_s=0.5, want_forks=True)
    src.open()
    yield src
    src.close()


def run_true() -> int:
    child = subprocess.Popen(["/bin/true"])
    child.wait()
    return child.pid


def own_rules(cluster: Cluster) -> list[str]:
    """Rules that match only this test's cluster: other clusters on the host (other tests)
    must not be touched. A --data-dir rule also keeps the fallbacks from guessing."""
    pattern = re.escape(f"postgres -D {cluster.data_dir}") + "(?: |$)"
    return ["--pattern", pattern, "--data-dir", cluster.data_dir]


def wait_handled(watcher: Watcher, pm: int, timeout_s: float = 15) -> str:
    """The watcher's own log line about postmaster `pm`: it protected it, or found it at the
    target already (on a shared host another watcher may have been first; alone, as in CI,
    this watcher is the only writer)."""
    patterns = (f"protected postmaster pid={pm} ", f"postmaster pid={pm} data_dir=")

    def line() -> str:
        return next((x for x in watcher.text().splitlines() if any(p in x for p in patterns)), "")

    found = wait_for(line, timeout_s, 0.02, what=f"the watcher's log line about pid {pm}")
    assert isinstance(found, str)
    return found


def test_subscription_is_acknowledged_and_an_exec_yields_its_pid(
    source: NetlinkSource,
) -> None:
    assert source.fileno() is not None
    assert source.timeout_s() is None
    assert source.filtered is kernel_filters_events(os.uname().release)
    assert source.rcvbuf_effective_bytes >= 1 << 20  # SO_RCVBUFFORCE as root
    pid = run_true()
    seen: list[object] = []

    def got_exec() -> bool:
        seen.extend(source.read())
        return any(isinstance(e, Examine) and e.pid == pid for e in seen)

    wait_for(got_exec, 5, what=f"exec event of pid {pid}")
    exec_event = next(e for e in seen if isinstance(e, Examine) and e.pid == pid)
    # The kernel stamps events with CLOCK_MONOTONIC, the clock of time.monotonic_ns().
    assert 0 < time.monotonic_ns() - exec_event.ts_ns < 5_000_000_000
    assert Forked(os.getpid(), pid, 0) in [
        Forked(e.parent, e.child, 0) for e in seen if isinstance(e, Forked)
    ]
    assert source.stats()["events"] >= 2
    assert source.stats()["enobufs"] == 0


def test_only_the_kernel_can_send_to_the_socket(source: NetlinkSource) -> None:
    """Another process's unicast (a forged exec event for pid 4242) is refused."""
    fd = source.fileno()
    assert fd is not None
    port = socket.socket(fileno=os.dup(fd))
    try:
        port_id = port.getsockname()[0]
    finally:
        port.close()
    event = struct.pack("=IIQII", 0x2, 0, 1, 4242, 4242).ljust(40, b"\0")
    cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(event), 0) + event
    forged = struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn
    assert any(e == Examine(4242, 1) for e in decode(forged))  # it would decode
    forger = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 11)
    try:
        forger.bind((0, 0))
        with pytest.raises(ConnectionRefusedError):
            forger.sendto(forged, (port_id, 0))
    finally:
        forger.close()
    assert Examine(4242, 1) not in source.read()


def test_overflow_yields_one_rescan_and_reading_goes_on() -> None:
    """Unread, an 8 KiB buffer overflows after a few events: read() reports ENOBUFS as a
    Rescan (once), counts it, and the next exec is delivered as usual."""
    src = NetlinkSource(rcvbuf_bytes=4096, ack_timeout_s=0.5)
    src.open()
    try:
        assert src.rcvbuf_effective_bytes <= 16384
        for _ in range(60):  # ~60 exec events into a buffer that holds about ten
            run_true()
        first = src.read()
        rescans = [e for e in first if isinstance(e, Rescan)]
        assert rescans == [Rescan("netlink lost events (ENOBUFS)")]
        assert src.stats()["enobufs"] >= 1
        assert src.stats()["rescans"] == 1
        src.read()  # whatever queued after the overflow
        pid = run_true()
        seen: list[object] = []

        def got_exec() -> bool:
            seen.extend(src.read())
            return any(isinstance(e, Examine) and e.pid == pid for e in seen)

        wait_for(got_exec, 5, what="an exec after the overflow")
    finally:
        src.close()


def test_close_sends_ignore_so_the_socket_goes_quiet() -> None:
    """A duplicate of the descriptor keeps the socket alive after close(): it still receives
    exec events unless the kernel was told IGNORE for it."""
    src = NetlinkSource(rcvbuf_bytes=1 << 20, ack_timeout_s=0.5)
    src.open()
    fd = src.fileno()
    assert fd is not None
    spy = socket.socket(fileno=os.dup(fd))
    spy.setblocking(False)

    def drain() -> list[int]:
        pids: list[int] = []
        while True:
            try:
                data = spy.recv(65536)
            except BlockingIOError:
                return pids
            pids += [e.pid for e in decode(data) if isinstance(e, Examine)]

    try:
        drain()
        pid = run_true()  # the event is queued during execve(), before the child is reaped
        assert pid in drain(), "the subscribed socket did not see an exec"
        src.close()
        src.close()  # idempotent
        assert src.fileno() is None
        pid = run_true()
        assert drain() == [], "events still arrive after close(): IGNORE was not sent"
    finally:
        spy.close()
        src.close()


def test_watch_netlink_protects_a_real_postmaster(make_cluster: MakeCluster) -> None:
    cluster = make_cluster()
    watcher = Watcher("--source", "netlink", "--score", "0", *own_rules(cluster))
    try:
        log = watcher.wait_ready()
        assert "source: netlink (asked for)" in log
        cluster.start()
        pm = cluster.postmaster_pid()
        wait_for(lambda: read_score(pm) == 0, 10, what="postmaster at oom_score_adj 0")
        line = wait_handled(watcher, pm)
        if "protected postmaster" in line:  # else another watcher on this host was first
            assert "oom_score_adj 1000 -> 0 source=netlink" in line
            assert re.search(r"latency_us=\d+", line), line  # from the exec event's timestamp
        cluster.psql("select 1")
        children_settled_at(cluster.postmaster_pid(), 1000)
    finally:
        assert watcher.stop() == 0


# --- namespaces: refused, and auto falls back ----------------------------------------------

UNSHARE_PID = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
UNSHARE_NET = ["unshare", "--net"]


def stop_in_namespace(watcher: Watcher) -> None:
    """unshare blocks SIGTERM; the watcher (PID 1 of a pid namespace, or unshare's exec'd
    self) handles it."""
    target = children_of(watcher.proc.pid) or [watcher.proc.pid]
    for pid in target:
        os.kill(pid, signal.SIGTERM)
    watcher.proc.wait(timeout=10)


def test_netlink_refused_in_a_pid_namespace_and_auto_falls_back_to_poll() -> None:
    asked = subprocess.run(
        [*UNSHARE_PID, *PGOOM, "watch", "--source", "netlink", "--log-file", "", "--pattern", "x"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert asked.returncode == 6, asked.stderr
    assert (
        "pgoom: no ack from the proc connector within 0.5 s: not in the initial pid/user "
        "namespace" in asked.stderr
    )
    assert "Traceback" not in asked.stderr

    # In a fresh pid namespace no postmaster is visible, so no data directory: poll.
    watcher = Watcher("--pattern", "x", prefix=UNSHARE_PID)
    try:
        log = watcher.wait_for_log("source: poll")
        line = next(x for x in log.splitlines() if "source: poll" in x)
        assert "netlink unavailable: no ack from the proc connector" in line
        assert "not in the initial pid/user namespace" in line
        watcher.wait_ready()
    finally:
        stop_in_namespace(watcher)


def test_netlink_refused_in_a_net_namespace_and_auto_falls_back_to_inotify() -> None:
    asked = subprocess.run(
        [*UNSHARE_NET, *PGOOM, "watch", "--source", "netlink", "--log-file", "", "--pattern", "x"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert asked.returncode == 6, asked.stderr
    assert "ECONNREFUSED" in asked.stderr
    assert "non-initial network namespace" in asked.stderr

    data_dir = tempfile.mkdtemp(prefix="pgoom-nl-dd-")
    watcher = Watcher("--pattern", "x", "--data-dir", data_dir, prefix=UNSHARE_NET)
    try:
        log = watcher.wait_for_log("source: inotify")
        line = next(x for x in log.splitlines() if "source: inotify" in x)
        assert data_dir in line
        assert "netlink unavailable: the proc connector refused the subscription" in line
        watcher.wait_ready()
    finally:
        stop_in_namespace(watcher)
        os.rmdir(data_dir)


# --- overflow ----------------------------------------------------------------------------


@pytest.mark.slow  # ~19 s: tens of thousands of execs; skip with -m "not slow"
def test_storm_with_a_small_buffer_forces_enobufs_and_a_postmaster_is_still_protected(
    make_cluster: MakeCluster,
) -> None:
    """>= 30k execs against an 8 KiB receive buffer (4096, doubled by the kernel): the
    kernel drops events, the watcher says so, rescans, and keeps going; a postmaster started
    in the middle of the storm ends protected although its own exec event was lost.

    The watcher is stopped (SIGSTOP) through the first part of the storm and the
    postmaster's start, as a watcher starved of CPU would be: the overflow then happens on
    every machine, however fast, instead of depending on the load of the moment."""
    cluster = make_cluster()
    watcher = Watcher(
        "--source", "netlink", "--score", "0", "--rcvbuf", "4096", *own_rules(cluster)
    )
    storm: list[subprocess.Popen[bytes]] = []
    try:
        watcher.wait_ready()
        per_process = 10_000
        os.kill(watcher.proc.pid, signal.SIGSTOP)
        try:
            # 2000 execs fill the stopped watcher's 8 KiB buffer many times over, so the
            # postmaster's own exec event below is certainly dropped by the kernel.
            burst = [sys.executable, "-c", STORM, "2000"]
            subprocess.run(burst, check=True, timeout=120)
            storm = [
                subprocess.Popen([sys.executable, "-c", STORM, str(per_process)]) for _ in range(3)
            ]
            cluster.start(wait=False)
            pm = cluster.postmaster_pid()  # it exec'd and wrote its lock file meanwhile
        finally:
            os.kill(watcher.proc.pid, signal.SIGCONT)
        watcher.wait_for_log("ENOBUFS", 60)
        for proc in storm:
            assert proc.wait(timeout=120) == 0
        cluster.wait_ready()
        wait_for(lambda: read_score(pm) == 0, 15, what="postmaster protected after the storm")
        wait_handled(watcher, pm)
        assert watcher.proc.poll() is None, "the watcher died in the storm"
        log = watcher.text()
        assert "netlink: receive buffer overflowed (ENOBUFS)" in log
        assert "events were lost, rescanning /proc" in log
        assert "Traceback" not in log
    finally:
        for proc in storm:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert watcher.stop() == 0
