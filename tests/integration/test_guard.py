"""The guard on the real kernel: a real cgroup v1 memory cgroup, real PostgreSQL inside it,
a real runaway query. The guard runs in-process (watcher.guard.Guards driven by a small
epoll loop in a thread); `pgoom watch --guard` end to end is in test_guard_watch.py."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from loguru import logger

from scripts.oomharness.cgroup import MemoryCgroup
from scripts.oomharness.pgcluster import HarnessCluster, Session
from tests.support.guardloop import GuardLoop, v1_memcg
from tests.support.pg import Template, alive, wait_for
from watcher.guard import Guards, GuardSettings
from watcher.guard.children import read_children, read_members
from watcher.guard.memory import MemoryGroup, MemoryReader
from watcher.guard.victim import CLIENT, choose, classify, kernel_choice
from watcher.procfs import ProcFS

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (memory cgroups)")

LIMIT_BYTES = 300 << 20
# A runaway query: array_agg's state doubles until it would cross the limit.
BIG_QUERY = "select array_length(array_agg(g), 1) from (select generate_series(1, 150000000) g) s;"
# Session-level memory a cancel does not give back: local buffers for temporary tables are
# allocated as the session touches them and kept until the session ends.
SESSION_HOG = (
    "set temp_buffers = '1GB';\n"
    "create temp table hog as select repeat('x', 2000) as pad from generate_series(1, 400000);"
)


@pytest.fixture
def memcg() -> Iterator[MemoryCgroup]:
    yield from v1_memcg(LIMIT_BYTES, "pgoom-guard-test")


@pytest.fixture
def cluster(pg_template: Template, memcg: MemoryCgroup) -> Iterator[HarnessCluster]:
    c = HarnessCluster(pg_template, memcg.procs_file, launcher_score=1000, children_score=1000)
    c.start()
    yield c
    c.destroy()


def guarded(memcg: MemoryCgroup, pm: int, **settings: Any) -> tuple[Guards, GuardLoop]:
    actions: list[dict[str, Any]] = []
    guards = Guards(
        GuardSettings(**settings),
        ProcFS(),
        report=lambda name, fields: actions.append(fields) if name == "guard_action" else None,
    )
    start = ProcFS().stat(pm).starttime_ticks
    assert guards.guard(pm, start, MemoryGroup(1, memcg.path)) is not None
    loop = GuardLoop(guards)
    loop.actions = actions
    return guards, loop


def backend_pid(session: Session) -> int:
    out = session.run("select pg_backend_pid();")
    assert out.ok, out.lines
    return int(out.lines[-1])


def test_runaway_query_is_cancelled_and_nobody_else_loses_anything(
    cluster: HarnessCluster, memcg: MemoryCgroup
) -> None:
    pm = cluster.postmaster_pid()
    bystander, runaway = Session(cluster), Session(cluster)
    bystander_pid, runaway_pid = backend_pid(bystander), backend_pid(runaway)
    oom_before = memcg.oom_kills()
    guards, loop = guarded(memcg, pm)
    try:
        result = runaway.run(BIG_QUERY, timeout_s=120)
    finally:
        loop.stop()
        guards.close()
    assert not result.ok
    assert any("canceling statement due to user request" in line for line in result.lines), (
        result.lines
    )
    assert memcg.oom_kills() == oom_before, "the kernel's OOM killer ran"
    assert alive(pm) and alive(runaway_pid) and alive(bystander_pid)
    # The session that ran the query survives the cancel; so does everybody else's.
    assert backend_pid(runaway) == runaway_pid
    assert backend_pid(bystander) == bystander_pid
    assert [(a["pid"], a["signal"], a["outcome"]) for a in loop.actions] == [
        (runaway_pid, "SIGINT", "relieved")
    ]
    with open(cluster.log_path) as f:
        log = f.read()
    assert "terminating any other active server processes" not in log
    bystander.close()
    runaway.close()


def test_the_growing_query_is_stopped_not_the_larger_idle_sessions(
    cluster: HarnessCluster, memcg: MemoryCgroup
) -> None:
    """Four idle sessions of ~50 MiB each are the largest backends; a fifth session adds
    settings in 128 KiB steps until the group crosses the threshold. The guard must stop the
    session that is growing (cancel, then terminate: settings stay with the session), never
    one of the idle ones, and the kernel must not kill anything."""
    pm = cluster.postmaster_pid()
    idle = [Session(cluster) for _ in range(4)]
    idle_pids = [backend_pid(s) for s in idle]
    for session in idle:
        held = session.run(
            "select count(set_config('t.h' || i, repeat('x', 1 << 20), false)) "
            "from generate_series(1, 50) i;"
        )
        assert held.ok, held.lines
    grower = Session(cluster)
    grower_pid = backend_pid(grower)
    oom_before = memcg.oom_kills()
    guards, loop = guarded(memcg, pm, grace_s=0.5)
    try:
        grower.run(
            "select count(set_config('t.g' || i, repeat('x', 131072), false)) "
            "from generate_series(1, 800) i;",
            timeout_s=120,
        )
        wait_for(lambda: bool(loop.actions), 10, 0.01, what="the guard")
        wait_for(lambda: not alive(grower_pid) or len(loop.actions) >= 2, 5, 0.01, what="it")
    finally:
        loop.stop()
        guards.close()
    assert {a["pid"] for a in loop.actions} == {grower_pid}, loop.actions
    assert loop.actions[0]["signal"] == "SIGINT"
    assert memcg.oom_kills() == oom_before, "the kernel's OOM killer ran"
    assert [backend_pid(s) for s in idle] == idle_pids  # every idle session is still there
    with open(cluster.log_path) as f:
        assert "terminating any other active server processes" not in f.read()
    for session in [*idle, grower]:
        session.close()


def test_a_cancel_that_frees_nothing_escalates_to_terminate(
    cluster: HarnessCluster, memcg: MemoryCgroup
) -> None:
    pm = cluster.postmaster_pid()
    bystander, hog = Session(cluster), Session(cluster)
    bystander_pid, hog_pid = backend_pid(bystander), backend_pid(hog)
    oom_before = memcg.oom_kills()
    guards, loop = guarded(memcg, pm, grace_s=0.5)
    try:
        result = hog.run(SESSION_HOG, timeout_s=120)
        wait_for(lambda: len(loop.actions) >= 2, 10, 0.01, what="the escalation")
    finally:
        loop.stop()
        guards.close()
    assert [(a["pid"], a["signal"], a["outcome"]) for a in loop.actions] == [
        (hog_pid, "SIGINT", "no_relief"),
        (hog_pid, "SIGTERM", "relieved"),
    ], (loop.actions, result.lines)
    assert memcg.oom_kills() == oom_before
    wait_for(lambda: not alive(hog_pid), 10, 0.01, what="the terminated backend to exit")
    assert alive(pm)
    assert backend_pid(bystander) == bystander_pid
    with open(cluster.log_path) as f:
        log = f.read()
    assert "terminating connection due to administrator command" in log
    # Never a SIGKILL, and so never a crash restart.
    assert "was terminated by signal" not in log
    assert "terminating any other active server processes" not in log
    bystander.close()
    hog.close()


def test_auxiliary_processes_are_never_candidates(cluster: HarnessCluster) -> None:
    pm = cluster.postmaster_pid()
    procfs = ProcFS()
    wait_for(lambda: len(read_children(procfs, pm)) >= 5, 10, 0.05, what="the auxiliaries")
    aux = [c for c in read_children(procfs, pm) if "[local]" not in " ".join(c.argv)]
    assert len(aux) >= 5, [c.argv for c in aux]
    # The checkpointer, walwriter, autovacuum launcher, ...: never a client backend, and
    # never chosen even with no floor and nothing else to choose.
    assert all(classify(c.argv).name != CLIENT for c in aux), [c.argv for c in aux]
    assert choose(aux, floor_bytes=0) is None
    session = Session(cluster)
    pid = backend_pid(session)
    assert session.run("select set_config('t.big', repeat('x', 8388608), false);").ok
    chosen = choose(read_children(procfs, pm), floor_bytes=0)
    assert chosen is not None and chosen.pid == pid
    session.close()


def test_a_hog_that_is_not_postgres_is_left_to_the_kernel(
    cluster: HarnessCluster, memcg: MemoryCgroup
) -> None:
    import subprocess

    from scripts.oomharness.cgroup import enter

    pm = cluster.postmaster_pid()
    with open(f"/proc/{pm}/oom_score_adj", "w") as f:
        f.write("0")  # what pgoom watch does: the kernel's choice falls among the rest
    bystander = Session(cluster)
    bystander_pid = backend_pid(bystander)
    # Above the floor: a session the guard could stop, and must not (the kernel's choice
    # is the hog, whose kill costs PostgreSQL nothing).
    assert bystander.run("select set_config('t.hold', repeat('x', 20 << 20), false);").ok
    oom_before = memcg.oom_kills()
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING")
    guards, loop = guarded(memcg, pm)

    def join() -> None:
        enter(memcg.procs_file)
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")  # as bad a candidate as the backends: the largest one dies

    code = "b = []\nwhile True:\n    b.append(b'\\x01' * (1 << 20))\n"
    try:
        hog = subprocess.Popen(["python3", "-c", code], preexec_fn=join)
        assert hog.wait(60) == -signal.SIGKILL
        wait_for(lambda: memcg.oom_kills() > oom_before, 5, 0.01, what="the kernel's kill")
    finally:
        loop.stop()
        guard = next(iter(guards.entries.values())).guard
        guards.close()
        logger.remove(sink)
    assert loop.actions == []
    # It saw the pressure, and named the process the kernel then killed.
    assert guard.counters.stood_aside > 0, guard.status()
    assert any(f"would take pid {hog.pid}, which is not PostgreSQL" in line for line in lines)
    assert alive(pm) and backend_pid(bystander) == bystander_pid
    bystander.close()


def test_working_set_excludes_page_cache(memcg: MemoryCgroup, tmp_path: Any) -> None:
    import subprocess

    from scripts.oomharness.cgroup import enter

    path = tmp_path / "fill"
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=1M", "count=400", "status=none"],
        preexec_fn=lambda: enter(memcg.procs_file),
        check=True,
    )
    sample = MemoryReader(MemoryGroup(1, memcg.path)).sample()
    assert sample.limit_bytes == LIMIT_BYTES
    assert sample.usage_bytes > LIMIT_BYTES * 0.8  # the cache filled the group...
    assert sample.working_set_bytes < LIMIT_BYTES * 0.5  # ...and is not its working set


# Its intermittent failure (once in three full-suite runs, output not kept) is what a torn
# reading does: usage read before a stall, memory.stat after dd's O_TRUNC dropped the cache,
# 299 MiB of "working set" where 257 were in use, the idle holder terminated (reproduced in
# this scenario with a busy thread in the guard's process). Fixed in MemoryReader
# (watcher/guard/memory.py), checked deterministically in tests/unit/test_guard_memory.py.
# A guard that decides on usage fails this test (it terminated the holder when tried); one
# that takes torn readings, only now and then.
def test_no_action_at_85_percent_while_the_page_cache_fills_the_rest(
    cluster: HarnessCluster, memcg: MemoryCgroup, tmp_path: Any
) -> None:
    import subprocess

    from scripts.oomharness.cgroup import enter

    pm = cluster.postmaster_pid()
    reader = MemoryReader(MemoryGroup(1, memcg.path))
    holder, worker = Session(cluster), Session(cluster)
    step = 0
    while reader.sample().working_set_bytes < LIMIT_BYTES * 0.85:
        step += 1
        assert holder.run(f"select set_config('t.h{step}', repeat('x', 1048576), false);").ok
    guards, loop = guarded(memcg, pm)
    try:
        for _ in range(3):
            # Written, then read back: the cache is active, and still reclaimable.
            for argv in (
                ["dd", "if=/dev/zero", f"of={tmp_path}/fill", "bs=1M", "count=300", "status=none"],
                ["cat", f"{tmp_path}/fill"],
            ):
                subprocess.run(
                    argv,
                    stdout=subprocess.DEVNULL,
                    preexec_fn=lambda: enter(memcg.procs_file),
                    check=True,
                )
            assert worker.run("select count(*) from generate_series(1, 200000);").ok
    finally:
        loop.stop()
        guard = next(iter(guards.entries.values())).guard
        guards.close()
    assert guard.counters.pressure_events, vars(guard.counters)  # it was woken, and looked...
    assert loop.actions == [], (loop.actions, reader.sample())  # ...and did nothing
    assert holder.run("select 1;").ok
    holder.close()
    worker.close()


def test_host_psi_trigger_registers_on_this_kernel() -> None:
    """The bare-host source on the real kernel: a PSI trigger on /proc/pressure/memory
    (the 2 s window when CAP_SYS_RESOURCE is missing, as here), pollable, and quiet while the
    host is not stalling on memory."""
    import select

    from watcher.guard.pressure import open_pressure

    if not os.path.exists("/proc/pressure/memory"):
        pytest.skip("no PSI on this kernel")
    source = open_pressure(MemoryGroup(0, "/proc"), 0)
    try:
        (registration,) = source.registrations
        assert registration.signal == "psi" and registration.mask == select.EPOLLPRI
        poller = select.epoll()
        poller.register(registration.fd, registration.mask)
        assert poller.poll(0) == []  # armed, nothing to report
        poller.close()
    finally:
        source.close()
    sample = MemoryReader(MemoryGroup(0, "/proc")).sample()
    assert sample.limit_bytes and 0 < sample.working_set_bytes < sample.limit_bytes


def test_kernel_choice_names_the_process_the_kernel_then_kills(memcg: MemoryCgroup) -> None:
    """Four real processes in a 300 MiB memory cgroup, sized and scored so that neither RSS
    alone nor oom_score_adj alone names the kernel's victim: A holds 100 MiB at 0, B 40 MiB
    at 700 (40 + 700/1000 of the limit = 250), D nothing at 750 (225), C grows to 160 MiB at
    0. kernel_choice, read while C grows (the guard's view at its threshold), must name B,
    and the kernel's OOM killer must then kill B and only B (without B the rest fit)."""
    import subprocess

    from scripts.oomharness.cgroup import enter

    code = (
        "import sys, time\n"
        "blocks = []\n"
        "for i in range(int(sys.argv[1])):\n"
        "    blocks.append(b'\\x01' * (1 << 20))\n"
        "    if i == int(sys.argv[2]): print('grown', flush=True)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )

    def start(mib: int, adj: int, signal_at: int = -1) -> subprocess.Popen[bytes]:
        def join() -> None:
            enter(memcg.procs_file)
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write(str(adj))

        return subprocess.Popen(
            ["python3", "-c", code, str(mib), str(signal_at)],
            stdout=subprocess.PIPE,
            preexec_fn=join,
        )

    oom_before = memcg.oom_kills()
    a = start(100, 0)
    b = start(40, 700)
    d = start(0, 750)
    procs = [a, b, d]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        c = start(160, 0, signal_at=120)
        procs.append(c)
        assert c.stdout is not None and c.stdout.readline() == b"grown\n"
        reader = MemoryReader(MemoryGroup(1, memcg.path))
        members = read_members(ProcFS(), reader.member_pids())
        assert {m.pid for m in members} >= {a.pid, b.pid, c.pid, d.pid}
        chosen = kernel_choice(members, LIMIT_BYTES)
        assert chosen is not None and chosen.pid == b.pid, members
        assert b.wait(60) == -signal.SIGKILL
        assert c.stdout.readline() == b"ready\n"  # C reached its 160 MiB
        assert memcg.oom_kills() == oom_before + 1
        assert a.poll() is None and c.poll() is None and d.poll() is None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
