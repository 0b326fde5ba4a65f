"""watcher.memcg on the real kernel: a memory cgroup we create, a process of ours in it."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.support.pg import wait_for
from watcher import memcg
from watcher.procfs import ProcFS

V1_ROOT = "/sys/fs/cgroup/memory"
LIMIT_BYTES = 64 * 1024 * 1024

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.isdir(V1_ROOT), reason="needs root and a v1 memory cgroup"
)


@pytest.fixture
def cgroup_with_process() -> Iterator[tuple[str, int]]:
    """A v1 memory cgroup with a limit and one sleeping process of ours in it."""
    # Our own cgroup is the parent, so the test works wherever the runner itself was put.
    own = memcg.memory_cgroup_line(memcg.parse_proc_cgroup(open("/proc/self/cgroup").read()))
    assert own is not None and own[0] == 1
    directory = f"{V1_ROOT}{own[1].rstrip('/')}/pgoom-memcg-{uuid.uuid4().hex[:8]}"
    os.mkdir(directory)
    with open(f"{directory}/memory.limit_in_bytes", "w") as f:
        f.write(str(LIMIT_BYTES))
    proc = subprocess.Popen(
        ["sh", "-c", f"echo $$ > {directory}/cgroup.procs && exec sleep 60"],
    )
    try:

        def joined() -> bool:
            return str(proc.pid) in open(f"{directory}/cgroup.procs").read().split()

        wait_for(joined, 5, 0.01, what="the process in its cgroup")
        yield directory, proc.pid
    finally:
        proc.kill()
        proc.wait()
        os.rmdir(directory)


def test_locate_and_state_of_a_real_v1_cgroup(cgroup_with_process: tuple[str, int]) -> None:
    directory, pid = cgroup_with_process
    view = memcg.CgroupView(ProcFS())
    cg = view.locate(pid)
    assert cg is not None
    assert cg.version == 1
    assert cg.directory == directory
    state = view.state(cg)
    assert state is not None
    assert state.limit_bytes == LIMIT_BYTES
    assert state.effective_limit_bytes == LIMIT_BYTES
    assert state.usage_bytes is not None and state.usage_bytes > 0
    assert state.working_set_bytes is not None and state.working_set_bytes <= state.usage_bytes
    assert state.oom_group is None
    assert state.oom_kills == 0
    assert memcg.group_kill(cg, state) is False
