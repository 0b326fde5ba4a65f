"""A Kubernetes pod with the sidecar, simulated without Docker (deploy/kubernetes/sidecar):

- the pod's PID namespace with a pause-like PID 1 (`unshare --pid --fork --mount-proc`);
- the database container: PostgreSQL as uid 26 with no capabilities at all, started at
  oom_score_adj 1000 (a BestEffort pod), children at 1000 through PG_OOM_ADJUST_VALUE;
- the sidecar: `pgoom watch` as root with only CAP_DAC_OVERRIDE and CAP_SYS_RESOURCE in its
  bounding set (what the CR snippet asks for; SYS_RESOURCE is missing on this machine),
  joining the pod's PID namespace with nsenter.

The sidecar must refuse netlink there (the proc connector ignores subscriptions from a
non-initial PID namespace: no ack), choose inotify on the data directory, and protect the
postmaster: 1000 -> 0 (nobody here may go below 0).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from tests.support.pg import (
    PGDATA_ROOT,
    Template,
    children_of,
    children_settled_at,
    read_score,
    wait_for,
)
from tests.support.watcher import Watcher

pytestmark = pytest.mark.root

# Like Kubernetes' pause: PID 1 that reaps whatever is reparented to it and ends on TERM/INT.
PAUSE = """
import os, signal, sys
def reap(*_):
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
signal.signal(signal.SIGCHLD, reap)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
while True:
    signal.pause()
"""
CAP_DAC_OVERRIDE = 1
CAP_SYS_RESOURCE = 24


def status_field(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    raise KeyError(name)


class Pod:
    """The pod's PID namespace; containers join it with nsenter (-p pid, -m its /proc)."""

    def __init__(self) -> None:
        self.unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "/usr/bin/python3",
             "-c", PAUSE],
        )  # fmt: skip
        found = wait_for(lambda: children_of(self.unshare.pid), 10, what="pause")
        assert isinstance(found, list)
        self.pause = found[0]
        wait_for(lambda: "signal.pause" in self.cmdline(self.pause), 10, what="pause exec")

    @staticmethod
    def cmdline(pid: int) -> str:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def enter(self) -> list[str]:
        return ["nsenter", "-t", str(self.pause), "-p", "-m", "--"]

    def close(self) -> None:
        # SIGKILL to unshare: --kill-child kills the pause, and with PID 1 the namespace.
        if self.unshare.poll() is None:
            self.unshare.send_signal(signal.SIGKILL)
            self.unshare.wait()
        wait_for(lambda: not os.path.exists(f"/proc/{self.pause}"), 10, what="pod to end")


@pytest.fixture
def pod() -> Iterator[Pod]:
    if not shutil.which("nsenter") or not shutil.which("setpriv"):
        pytest.skip("needs nsenter and setpriv (util-linux)")
    pod = Pod()
    yield pod
    pod.close()


@pytest.fixture
def data_dir(pg_template: Template) -> Iterator[str]:
    # Not tests.support.pg.Cluster: its stop() would signal the PID in postmaster.pid, which
    # is a PID of the pod's namespace, not of ours. Not under /pgdata/pg either: a watcher
    # with the default pattern running elsewhere on the host must not protect it for us.
    path = f"{PGDATA_ROOT}/sim{uuid.uuid4().hex[:8]}"
    subprocess.run(["cp", "-a", pg_template.path, path], check=True)
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# (database container's score, the sidecar's --score, PG_OOM_ADJUST_VALUE). This machine
# cannot go below 0, so it protects with positive offsets (a BestEffort pod's 1000); the VM
# (scripts/vm-test.sh) runs the production numbers.
POSITIVE_OFFSETS = (1000, 0, 1000)
PRODUCTION = (0, -900, 0)


@pytest.mark.parametrize(
    "scores",
    [pytest.param(POSITIVE_OFFSETS, id="offsets"),
     pytest.param(PRODUCTION, id="production", marks=pytest.mark.vm)],
)  # fmt: skip
def test_sidecar_protects_postmaster_in_a_shared_pid_namespace(
    pod: Pod, data_dir: str, pg_template: Template, scores: tuple[int, int, int]
) -> None:
    launcher, target, children = scores
    socket_dir = tempfile.mkdtemp(prefix="pgoom-sock-")
    os.chown(socket_dir, pg_template.uid, pg_template.gid)

    def besteffort() -> None:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(launcher))

    env = {
        "PATH": f"{pg_template.bindir}:/usr/bin:/bin",
        "LANG": "C",
        "PG_OOM_ADJUST_FILE": "/proc/self/oom_score_adj",
        "PG_OOM_ADJUST_VALUE": str(children),
    }
    log = open(os.path.join(socket_dir, "postgres.log"), "wb")
    database = subprocess.Popen(
        [*pod.enter(), "setpriv", f"--reuid={pg_template.uid}", f"--regid={pg_template.gid}",
         "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
         f"{pg_template.bindir}/postgres", "-D", data_dir, "-k", socket_dir],
        env=env, stdout=log, stderr=log, preexec_fn=besteffort,
    )  # fmt: skip
    log.close()
    sidecar = None
    try:
        found = wait_for(lambda: children_of(database.pid), 10, what="database container")
        assert isinstance(found, list)
        postmaster = found[0]
        pidfile = f"{data_dir}/postmaster.pid"
        wait_for(
            lambda: "postgres" in Pod.cmdline(postmaster) and os.path.exists(pidfile),
            30,
            what="postmaster",
        )
        assert status_field(postmaster, "CapEff") == "0000000000000000"
        assert status_field(postmaster, "CapBnd") == "0000000000000000"
        assert status_field(postmaster, "NSpid").split()[-1] != str(postmaster)  # in the pod
        assert read_score(postmaster) == launcher

        sidecar = Watcher(
            "--score", str(target), "--data-dir", data_dir, "--source", "auto",
            "--log-level", "DEBUG",
            prefix=[*pod.enter(), "setpriv", "--inh-caps=-all",
                    "--bounding-set=-all,+dac_override,+sys_resource", "--"],
        )  # fmt: skip
        text = sidecar.wait_ready(30)
        assert "netlink unavailable" in text
        assert f"source: inotify on {data_dir}" in text

        inside = wait_for(lambda: children_of(sidecar.proc.pid), 10, what="sidecar process")
        assert isinstance(inside, list)
        host_bounding = int(status_field(os.getpid(), "CapBnd"), 16)
        want = host_bounding & ((1 << CAP_DAC_OVERRIDE) | (1 << CAP_SYS_RESOURCE))
        assert int(status_field(inside[0], "CapEff"), 16) == want
        assert status_field(inside[0], "Uid").split()[0] == "0"

        wait_for(lambda: read_score(postmaster) == target, 15, what="postmaster protected")
        children_settled_at(postmaster, children)
    finally:
        pod.close()  # everything in the pod ends with its PID 1; the nsenters then exit
        database.wait(timeout=10)
        if sidecar is not None:
            sidecar.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)


def test_pid_namespace_is_what_the_sidecar_sees(pod: Pod) -> None:
    """Sanity of the simulation: inside the pod, PID 1 is the pause process."""
    done = subprocess.run(
        [*pod.enter(), sys.executable, "-c", "import os; print(open('/proc/1/cmdline').read())"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "signal.pause" in done.stdout
