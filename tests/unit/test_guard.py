"""The guard's parsing, victim choice and state machine, on captured samples and fake trees.
The real kernel, real PostgreSQL and real runaway queries are in tests/integration/test_guard.py."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from tests.unit.fakeproc import SAMPLES, FakeProc
from watcher.guard.children import read_children, read_members
from watcher.guard.episode import ACTING, COOLDOWN, OBSERVING, WATCHING, Guard, GuardSettings
from watcher.guard.locate import NotVisible, locate
from watcher.guard.memory import (
    MemoryGroup,
    MemoryReader,
    Sample,
    host_sample,
    v1_sample,
    v2_sample,
    working_set,
)
from watcher.guard.pressure import PressureUnavailable, V1Pressure
from watcher.guard.signals import Sent, send
from watcher.guard.victim import (
    AUX,
    CLIENT,
    PARALLEL,
    WALSENDER,
    Child,
    Member,
    choose,
    classify,
    display_title,
    is_idle,
    kernel_choice,
)
from watcher.memcg import CgroupView
from watcher.procfs import ProcFS

MIB = 1 << 20
GUARD_SAMPLES = SAMPLES / "guard"
TITLES = json.loads((GUARD_SAMPLES / "titles.json").read_text())


def argv_of(name: str) -> list[str]:
    """A captured title as parse_cmdline returns it (NUL padding dropped)."""
    raw: str = TITLES["titles"][name]
    parts = raw.split("\0")
    while parts and parts[-1] == "":
        parts.pop()
    return parts


# --- memory ----------------------------------------------------------------------------------


def test_v1_working_set_from_a_captured_memory_stat() -> None:
    stat = (GUARD_SAMPLES / "v1-memory.stat").read_text()
    sample = v1_sample("16101376\n", stat, "314572800\n")
    assert sample.limit_bytes == 314572800
    assert sample.usage_bytes == 16101376
    # total_cache 6193152 of which total_shmem 5984256 (shared buffers): 208896 reclaimable
    assert sample.working_set_bytes == 16101376 - (6193152 - 5984256)


def test_v1_unlimited_group_is_bounded_by_its_ancestors() -> None:
    stat = "total_inactive_file 0\nhierarchical_memory_limit 104857600\n"
    assert v1_sample("1\n", stat, "9223372036854771712\n").limit_bytes == 100 * MIB
    unlimited = "total_inactive_file 0\nhierarchical_memory_limit 9223372036854771712\n"
    assert v1_sample("1\n", unlimited, "9223372036854771712\n").limit_bytes is None


def test_page_cache_is_not_working_set() -> None:
    # A cgroup filled to its limit by a file read: usage at the limit, nearly all of it
    # inactive file pages.
    stat = "total_cache 300000000\ntotal_rss 10000000\ntotal_inactive_file 290000000\n"
    sample = v1_sample("310000000\n", stat, "314572800\n")
    assert sample.working_set_bytes == 10000000
    # Read twice, the cache is active: still reclaimable, still not the working set.
    active = "total_cache 300000000\ntotal_shmem 5000000\ntotal_inactive_file 1000000\n"
    assert v1_sample("310000000\n", active, "314572800\n").working_set_bytes == 15000000
    assert working_set(5, 9) == 0  # never negative (the counters are not read atomically)


def test_v2_sample_reads_the_nearest_limit() -> None:
    stat = "anon 200000000\nfile 50000000\nshmem 10000000\ninactive_file 40000000\n"
    sample = v2_sample("250000000\n", stat, f"{300 * MIB}\n")
    assert sample.limit_bytes == 300 * MIB
    assert sample.working_set_bytes == 250000000 - (50000000 - 10000000)
    assert v2_sample("1\n", "inactive_file 0\n", "max\n").limit_bytes is None
    assert v2_sample("1\n", "inactive_file 0\n", None).limit_bytes is None


def test_host_sample_counts_what_is_not_available() -> None:
    meminfo = "MemTotal:  1000 kB\nMemFree:  100 kB\nMemAvailable:  600 kB\nCached: 500 kB\n"
    sample = host_sample(meminfo)
    assert sample.limit_bytes == 1000 * 1024
    assert sample.working_set_bytes == 400 * 1024


def test_reader_on_a_fake_v1_tree(tmp_path: Path) -> None:
    (tmp_path / "memory.usage_in_bytes").write_text("209715200\n")
    (tmp_path / "memory.limit_in_bytes").write_text("314572800\n")
    (tmp_path / "memory.stat").write_text((GUARD_SAMPLES / "v1-memory.stat").read_text())
    sample = MemoryReader(MemoryGroup(1, str(tmp_path))).sample()
    assert sample == Sample(209715200, 209715200 - (6193152 - 5984256), 314572800)


def test_v1_pressure_without_event_control_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(PressureUnavailable, match=r"cgroup\.event_control"):
        V1Pressure(str(tmp_path), 100)


# --- locating the group ----------------------------------------------------------------------


def fake_cgroup_tree(tmp_path: Path, cgroup_line: str, limit: str) -> tuple[ProcFS, CgroupView]:
    """A fake /proc (pid 500 and self) and a fake v1 memory hierarchy under tmp_path/fs."""
    tree = FakeProc(tmp_path)
    tree.install("postmaster", pid=500, ppid=1)
    (tree.proc / "500" / "cgroup").write_text(cgroup_line)
    (tree.proc / "self").mkdir()
    mountinfo = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    (tree.proc / "self" / "mountinfo").write_text(mountinfo)
    group = tmp_path / "fs" / "sys/fs/cgroup/memory/pg"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(limit)
    (group / "memory.usage_in_bytes").write_text("1000\n")
    (group / "memory.stat").write_text(f"total_inactive_file 0\nhierarchical_memory_limit {limit}")
    return tree.procfs, CgroupView(tree.procfs, str(tmp_path / "fs"))


def test_locate_a_limited_v1_memory_cgroup(tmp_path: Path) -> None:
    procfs, view = fake_cgroup_tree(tmp_path, "4:memory:/pg\n0::/\n", "314572800\n")
    assert locate(procfs, 500, view) == MemoryGroup(1, "/sys/fs/cgroup/memory/pg")


def test_a_cgroup_without_a_limit_anywhere_is_the_host(tmp_path: Path) -> None:
    procfs, view = fake_cgroup_tree(tmp_path, "4:memory:/pg\n", "9223372036854771712\n")
    assert locate(procfs, 500, view) == MemoryGroup(0, procfs.root)


def test_a_cgroup_out_of_sight_is_not_guarded_as_the_host(tmp_path: Path) -> None:
    # What a sidecar sees of its neighbour's cgroup from inside its own cgroup namespace.
    procfs, view = fake_cgroup_tree(tmp_path, "4:memory:/../other\n", "314572800\n")
    with pytest.raises(NotVisible, match="DaemonSet"):
        locate(procfs, 500, view)


# --- who may be chosen -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("checkpointer", AUX),
        ("background writer", AUX),
        ("walwriter", AUX),
        ("autovacuum launcher", AUX),
        ("logical replication launcher", AUX),
        ("idle backend", CLIENT),
        ("active backend", CLIENT),
        ("walsender", WALSENDER),
        ("parallel worker", PARALLEL),
    ],
)
def test_captured_titles_are_classified(name: str, kind: str) -> None:
    assert classify(argv_of(name)).name == kind


def test_a_parallel_worker_names_its_leader() -> None:
    assert classify(argv_of("parallel worker")).leader == TITLES["parallel_leader_pid"]


@pytest.mark.parametrize(
    "title",
    [
        "postgres: alice shop 10.0.0.7(51234) SELECT",
        "postgres: alice shop [local] idle in transaction",
        "postgres: main: my user my db [local] UPDATE",  # names with spaces
    ],
)
def test_client_backends_without_a_cluster_name_or_with_odd_names(title: str) -> None:
    assert classify([title]).name == CLIENT


@pytest.mark.parametrize(
    "title",
    [
        "postgres: autovacuum worker",
        "postgres: walsender repl 10.0.0.2(4242) streaming 0/3000000",
        "postgres: main: walsender repl 10.0.0.2(4242) streaming 0/3000000",
        "postgres: logical replication worker for subscription 16394",
        "postgres: pg_cron launcher",
        "postgres: a b [local] c: checkpointer",  # a cluster name built to look like a client
        "postgres -D /pgdata/pg15",  # the postmaster keeps its command line
        "sh -c x [local]",
    ],
)
def test_never_a_client_backend(title: str) -> None:
    assert classify(title.split(" ") if title.startswith("postgres -D") else [title]).name != CLIENT


def child(
    pid: int, title: str, anon_mib: float, swap_mib: float = 0, shmem_mib: float = 0
) -> Child:
    return Child(
        pid, 1000 + pid, [title], int(anon_mib * MIB), int(swap_mib * MIB), int(shmem_mib * MIB)
    )


def test_the_largest_private_memory_is_chosen_and_shared_memory_does_not_count() -> None:
    children = [
        child(10, "postgres: checkpointer", 900),  # the largest, and never a victim
        child(11, "postgres: a db [local] SELECT", 100, shmem_mib=500),
        child(12, "postgres: b db [local] SELECT", 150, swap_mib=20),
        child(13, "postgres: walsender r [local] streaming 0/1", 800),
    ]
    chosen = choose(children, floor_bytes=64 * MIB)
    assert chosen is not None
    assert (chosen.pid, chosen.start_ticks, chosen.private_bytes) == (12, 1012, 170 * MIB)


def test_parallel_workers_count_towards_their_leader() -> None:
    children = [
        child(20, "postgres: a db [local] SELECT", 100),
        child(21, "postgres: b db [local] SELECT", 50),
        child(22, "postgres: parallel worker for PID 21", 40),
        child(23, "postgres: parallel worker for PID 21", 40),
        child(24, "postgres: parallel worker for PID 999", 500),  # no such leader here
        child(25, "postgres: parallel worker for PID 10", 500),  # a leader that is no client
        child(10, "postgres: checkpointer", 1),
    ]
    chosen = choose(children, floor_bytes=0)
    assert chosen is not None
    assert (chosen.pid, chosen.private_bytes, chosen.workers) == (21, 130 * MIB, 2)


def test_nobody_below_the_floor_and_ties_go_to_the_lower_pid() -> None:
    assert choose([child(30, "postgres: a db [local] SELECT", 2)], floor_bytes=64 * MIB) is None
    assert choose([], floor_bytes=0) is None
    tie = [child(41, "postgres: a db [local] x", 100), child(40, "postgres: b db [local] x", 100)]
    chosen = choose(tie, floor_bytes=0)
    assert chosen is not None and chosen.pid == 40


def test_titles_are_escaped_and_bounded_for_the_log() -> None:
    hostile = ['postgres: evil"\nguard: sent SIGKILL\\ db [local] \x1b[31mSELECT \udcff']
    shown = display_title(hostile)
    assert "\n" not in shown and "\x1b" not in shown
    assert shown == (
        'postgres: evil\\"\\x0aguard: sent SIGKILL\\\\ db [local] \\x1b[31mSELECT \\xff'
    )
    long = display_title(["postgres: " + "u" * 1000])
    assert len(long) <= 163 and long.endswith("...")


# --- reading children from a fake /proc --------------------------------------------------------


def set_memory(tree: FakeProc, pid: int, anon_kib: int, shmem_kib: int = 0) -> None:
    status = tree.proc / str(pid) / "status"
    text = status.read_text()
    text = re.sub(r"RssAnon:\s+\d+ kB", f"RssAnon:\t{anon_kib} kB", text)
    text = re.sub(r"RssShmem:\s+\d+ kB", f"RssShmem:\t{shmem_kib} kB", text)
    status.write_text(text)


def test_children_are_read_with_their_memory(tmp_path: Path) -> None:
    tree = FakeProc(tmp_path)
    pm = tree.install("postmaster", pid=100, ppid=1)
    tree.install("checkpointer", pid=101, ppid=100)
    tree.install("backend", pid=102, ppid=100, starttime=4242)
    tree.install("backend", pid=103, ppid=100, state="Z")  # exiting: skipped
    tree.install("backend", pid=200, ppid=1)  # not a child of this postmaster
    set_memory(tree, 102, 300 * 1024, shmem_kib=9999)
    children = read_children(tree.procfs, pm.pid)
    assert sorted(c.pid for c in children) == [101, 102]
    backend = next(c for c in children if c.pid == 102)
    assert (backend.start_ticks, backend.private_bytes) == (4242, 300 * MIB)
    assert backend.rss_shmem_bytes == 9999 * 1024
    chosen = choose(children, floor_bytes=64 * MIB)
    assert chosen is not None and chosen.pid == 102
    assert read_children(tree.procfs, 999) == []  # a postmaster that went away


def test_members_are_weighed_and_the_dying_told_apart(tmp_path: Path) -> None:
    tree = FakeProc(tmp_path)
    tree.install("postmaster", pid=100, ppid=1)
    tree.install("backend", pid=102, ppid=100)
    tree.install("backend", pid=103, ppid=100)  # SIGKILL pending: being killed
    tree.install("backend", pid=104, ppid=100)  # exiting: its memory map already gone
    tree.install("kthreadd", pid=2, ppid=0)
    set_memory(tree, 102, 300 * 1024)
    status = tree.proc / "103" / "status"
    status.write_text(re.sub(r"ShdPnd:\s+\w+", "ShdPnd:\t0000000000000100", status.read_text()))
    status = tree.proc / "104" / "status"
    status.write_text(re.sub(r"\n(Vm|Rss)\w+:[^\n]*", "", status.read_text()))
    members = {m.pid: m for m in read_members(tree.procfs, [100, 102, 103, 104, 2, 999])}
    # No kernel thread; 999, listed but gone when read, exited meanwhile: dying too.
    assert sorted(members) == [100, 102, 103, 104, 999]
    assert [pid for pid, m in members.items() if m.dying] == [103, 104, 999]
    vmrss = re.search(r"VmRSS:\s+(\d+)", (tree.proc / "102" / "status").read_text())
    assert vmrss is not None and members[102].rss_bytes == int(vmrss.group(1)) * 1024
    # On the host a task without a memory map is a kernel thread, not a dying process.
    host = read_members(tree.procfs, [2, 104], in_cgroup=False)
    assert host == []


def test_while_a_task_of_the_group_is_dying_the_guard_waits() -> None:
    fake = Fake()
    fake.others = [Member(500, 0, 0, 0, 1000, dying=True)]  # the kernel's victim, exiting
    fake.ws_mib = 290
    fake.guard.on_pressure("threshold")
    assert fake.sent == [] and fake.guard.counters.kill_under_way == 1
    fake.others = []
    fake.guard.on_pressure("threshold")
    assert fake.sent == [(11, "SIGINT")]


# --- signals -----------------------------------------------------------------------------------


def test_sigkill_is_not_in_the_vocabulary() -> None:
    with pytest.raises(ValueError, match="SIGINT or SIGTERM only"):
        send(
            FakeProc.__new__(FakeProc).procfs
            if False
            else __import__("watcher.procfs").procfs.ProcFS(),
            1,
            0,
            signal.SIGKILL,
        )


def test_a_reused_pid_is_not_signalled() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        start = ProcFS().stat(proc.pid).starttime_ticks
        assert send(ProcFS(), proc.pid, start + 1, signal.SIGTERM) is Sent.GONE
        assert proc.poll() is None  # still running: nothing was sent
        assert send(ProcFS(), proc.pid, start, signal.SIGTERM) is Sent.SENT
        assert proc.wait(10) == -signal.SIGTERM
        assert send(ProcFS(), proc.pid, start, signal.SIGINT) is Sent.GONE  # reaped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the state machine ---------------------------------------------------------------------------


class Fake:
    """A clock, a cgroup whose working set the test sets, children, and a recording kill()."""

    def __init__(self, **settings: Any) -> None:
        self.now_ns = 1_000_000_000_000
        self.ws_mib = 100.0
        self.limit_mib = 300.0
        self.children = [
            child(10, "postgres: checkpointer", 5),
            child(11, "postgres: a db [local] SELECT", 200),
            child(12, "postgres: b db [local] UPDATE", 70),
        ]
        self.sent: list[tuple[int, str]] = []
        self.answer = Sent.SENT
        self.reports: list[tuple[str, dict[str, Any]]] = []
        # Other tasks of the group, as the kernel weighs them (the children are added with
        # their private memory as RSS, all at oom_score_adj 1000).
        self.others: list[Member] = []
        self.group_kill = False
        self.gone: set[int] = set()  # victims that have exited
        self.guard = Guard(
            100,
            "/fake/memcg",
            self.sample,
            lambda: [c for c in self.children if c.pid not in self.gone],
            self.send,
            GuardSettings(**settings),
            lambda name, fields: self.reports.append((name, fields)),
            lambda: self.now_ns,
            members=self.members,
            private_of=self.private_of,
            group_kill=lambda: self.group_kill,
        )

    def members(self) -> list[Member]:
        alive = [c for c in self.children if c.pid not in self.gone]
        return [Member(c.pid, c.private_bytes, 0, 0, 1000) for c in alive] + self.others

    def private_of(self, pid: int, start: int) -> Any:
        if pid in self.gone:
            return None
        return next((c.private_bytes for c in self.children if c.pid == pid), None)

    def sample(self) -> Sample:
        ws = int(self.ws_mib * MIB)
        return Sample(ws + 50 * MIB, ws, int(self.limit_mib * MIB))

    def send(self, pid: int, start: int, signum: signal.Signals) -> Sent:
        answer = self.answer
        if answer is Sent.SENT:
            self.sent.append((pid, signum.name))
        return answer

    def advance(self, seconds: float) -> None:
        self.now_ns += int(seconds * 1e9)

    def tick(self) -> None:
        """What the loop does when the guard's deadline passes."""
        deadline = self.guard.deadline_s()
        assert deadline is not None
        self.now_ns = max(self.now_ns, int(deadline * 1e9))
        self.guard.on_timer()

    def settle(self) -> None:
        """Ticks until the guard has acted on what changed (a released victim is looked at
        again for release_settle_s before the guard calls it not enough)."""
        before = len(self.reports)
        for _ in range(20):
            if self.guard.deadline_s() is None or len(self.reports) > before:
                return
            self.tick()

    def actions(self) -> list[tuple[Any, ...]]:
        return [
            (f["pid"], f["signal"], f["outcome"]) for n, f in self.reports if n == "guard_action"
        ]


def test_pressure_below_the_threshold_does_nothing_and_needs_no_timer() -> None:
    fake = Fake()
    fake.ws_mib = 260  # 87 %: usage may be at the limit with cache, the working set is not
    fake.guard.on_pressure("threshold")
    fake.guard.on_pressure("vmpressure")
    assert fake.sent == [] and fake.guard.state == WATCHING
    assert fake.guard.deadline_s() is None


def test_a_runaway_query_is_cancelled_once_and_relief_is_timed() -> None:
    fake = Fake()
    fake.ws_mib = 275
    fake.guard.on_pressure("threshold", fake.now_ns - 1_200_000)
    assert fake.sent == [(11, "SIGINT")] and fake.guard.state == ACTING
    fake.tick()  # still high: keep checking, no second signal
    assert fake.sent == [(11, "SIGINT")]
    fake.ws_mib = 190
    fake.advance(0.003)
    fake.tick()
    assert fake.guard.state == WATCHING and fake.guard.deadline_s() is None
    ((_, action),) = [r for r in fake.reports if r[0] == "guard_action"]
    assert action["outcome"] == "relieved"
    assert action["event_to_signal_us"] == 1200
    assert 3 <= action["relief_ms"] <= 20
    assert action["working_set_bytes"] == 275 * MIB and action["limit_bytes"] == 300 * MIB
    # The v1 threshold fires again on the way down: the working set is read, nothing sent.
    fake.guard.on_pressure("threshold")
    assert fake.sent == [(11, "SIGINT")]
    # A new crossing is a new episode: the next runaway query is cancelled too.
    fake.ws_mib = 280
    fake.advance(2.5)
    fake.guard.on_pressure("threshold")
    assert fake.sent == [(11, "SIGINT"), (11, "SIGINT")]


def test_after_an_episode_without_relief_the_next_backend_waits_for_the_cooldown() -> None:
    fake = Fake(grace_s=0.5, cooldown_s=10)
    fake.ws_mib = 280
    fake.guard.on_pressure("threshold")
    fake.advance(0.6)
    fake.tick()  # SIGTERM
    fake.advance(0.6)
    fake.tick()  # no relief: cooldown
    fake.guard.on_pressure("vmpressure")
    assert fake.sent == [(11, "SIGINT"), (11, "SIGTERM")]  # not the next backend, and the next
    fake.advance(10)
    fake.guard.on_pressure("vmpressure")
    assert fake.sent[-1] == (11, "SIGINT")


def test_a_cancel_that_frees_nothing_escalates_to_terminate_and_never_further() -> None:
    fake = Fake(grace_s=0.5)
    fake.ws_mib = 280
    fake.guard.on_pressure("vmpressure")
    fake.advance(0.6)
    fake.tick()
    assert fake.sent == [(11, "SIGINT"), (11, "SIGTERM")]
    fake.advance(0.6)
    fake.tick()
    assert fake.guard.state == COOLDOWN
    assert fake.sent == [(11, "SIGINT"), (11, "SIGTERM")]  # nothing after SIGTERM, ever
    assert fake.actions() == [(11, "SIGINT", "no_relief"), (11, "SIGTERM", "no_relief")]


def test_relief_needs_the_margin_not_a_few_pages() -> None:
    fake = Fake()
    fake.ws_mib = 271
    fake.guard.on_pressure("threshold")
    fake.ws_mib = 268  # below 90 %, above 85 %: the session kept what it allocated
    fake.tick()
    assert fake.guard.state == ACTING


def test_an_idle_session_is_terminated_at_once() -> None:
    fake = Fake()
    fake.children = [child(11, "postgres: a db [local] idle in transaction", 200)]
    fake.ws_mib = 280
    fake.guard.on_pressure("threshold")
    assert fake.sent == [(11, "SIGTERM")]


def test_idle_is_read_from_the_end_of_the_title() -> None:
    assert is_idle(argv_of("idle backend"))
    assert not is_idle(argv_of("active backend"))
    assert not is_idle(["postgres: idle idle [local] SELECT"])
    assert is_idle(["postgres: a b [local] idle in transaction (aborted)"])


def test_dry_run_sends_nothing_and_reports_what_it_would_do() -> None:
    fake = Fake(dry_run=True)
    fake.ws_mib = 290
    fake.guard.on_pressure("threshold")
    assert fake.sent == []
    assert fake.actions() == [(11, "SIGINT", "dry_run")]
    assert fake.guard.state == COOLDOWN


def test_no_client_backend_above_the_floor_means_no_action() -> None:
    fake = Fake()
    fake.children = [
        child(10, "postgres: checkpointer", 250),
        child(12, "postgres: b db [local] idle", 3),
    ]
    fake.ws_mib = 295
    for _ in range(3):
        fake.guard.on_pressure("vmpressure")
    assert fake.sent == [] and fake.guard.counters.no_victim == 3


def test_a_running_query_that_is_not_growing_below_the_floor_is_left_alone() -> None:
    fake = Fake()
    fake.children = [child(12, "postgres: b db [local] SELECT", 3)]
    fake.ws_mib = 295
    fake.guard.on_pressure("vmpressure")
    assert fake.guard.state == OBSERVING and fake.guard.deadline_s() is not None
    fake.tick()
    assert fake.sent == [] and fake.guard.counters.no_victim == 1
    assert fake.guard.state == WATCHING and fake.guard.deadline_s() is None


def sessions_and_one_query(fake: Fake) -> None:
    many_idle_sessions(fake, count=3)
    fake.children.append(child(30, "postgres: u db [local] SELECT", 4))


def test_the_query_growing_fastest_is_cancelled_when_the_largest_is_idle() -> None:
    """The harness's many-backends: sessions of settings, and one query in flight adding
    more. The idle ones are larger; the query is what pushes (and is below the floor)."""
    fake = Fake()
    sessions_and_one_query(fake)
    fake.ws_mib = 272
    fake.guard.on_pressure("threshold")
    assert fake.sent == [] and fake.guard.state == OBSERVING
    fake.children[-1] = child(30, "postgres: u db [local] SELECT", 5)
    fake.tick()
    assert fake.sent == [(30, "SIGINT")]


def test_without_a_growing_query_the_largest_idle_session_is_terminated() -> None:
    fake = Fake()
    sessions_and_one_query(fake)
    fake.ws_mib = 272
    fake.guard.on_pressure("threshold")
    fake.children[-1] = child(30, "postgres: u db [local] SELECT", 4.1)  # < 256 KiB more
    fake.tick()
    assert fake.sent == [(20, "SIGTERM")]


def test_a_hog_the_kernel_would_take_is_left_to_the_kernel() -> None:
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING")
    fake = Fake()
    fake.children = [child(12, "postgres: b db [local] idle", 25)]  # above the floor
    fake.others = [Member(500, 250 * MIB, 0, 0, 1000)]  # the rest is a hog's
    fake.ws_mib = 295
    for _ in range(3):
        fake.guard.on_pressure("vmpressure")
    assert fake.sent == [] and fake.guard.counters.stood_aside == 3
    logger.remove(sink)
    assert sum("would take pid 500, which is not PostgreSQL" in line for line in lines) == 1


def test_a_small_backend_the_kernel_would_kill_is_stopped_instead() -> None:
    """No share-of-the-limit rule: 25 of 300 MiB is enough when the kernel's next kill is
    that backend (and with it a crash restart)."""
    fake = Fake()
    fake.children = [child(12, "postgres: b db [local] idle", 25)]
    fake.others = [Member(500, 20 * MIB, 0, 0, 1000), Member(100, 90 * MIB, 0, 0, -900)]
    fake.ws_mib = 295
    fake.guard.on_pressure("vmpressure")
    assert fake.sent == [(12, "SIGTERM")]


def test_under_a_group_kill_any_oom_costs_postgresql_so_the_guard_acts() -> None:
    fake = Fake()
    fake.children = [child(12, "postgres: b db [local] idle", 25)]
    fake.others = [Member(500, 250 * MIB, 0, 0, 1000)]
    fake.group_kill = True
    fake.ws_mib = 295
    fake.guard.on_pressure("vmpressure")
    assert fake.sent == [(12, "SIGTERM")]


def many_idle_sessions(fake: Fake, count: int = 5, mib: float = 12) -> None:
    fake.children = [
        child(20 + i, f"postgres: u db [local] idle {i}"[:-2], mib) for i in range(count)
    ]


def test_one_terminated_session_of_many_relieves_below_the_threshold() -> None:
    fake = Fake()
    many_idle_sessions(fake)
    fake.ws_mib = 272
    fake.guard.on_pressure("threshold")
    assert fake.sent == [(20, "SIGTERM")]  # the largest; the oldest of equals
    fake.gone.add(20)
    fake.ws_mib = 260  # below 90 %, not below 85 %: the victim's 12 MiB are back
    fake.tick()
    assert fake.actions() == [(20, "SIGTERM", "relieved")]
    assert fake.guard.state == WATCHING


@pytest.mark.parametrize(("after_mib", "outcome"), [(273, "relieved"), (275, "not_enough")])
def test_a_release_that_shows_in_the_working_set_relieves_above_the_threshold(
    after_mib: float, outcome: str
) -> None:
    """Down by at least half the victim's 12 MiB, nothing growing: relieved, although still
    above 270 (a second session terminated for the last MiB would be lost for nothing).
    Down by less: something else is growing as fast, the next victim follows."""
    fake = Fake()
    many_idle_sessions(fake)
    fake.ws_mib = 280
    fake.guard.on_pressure("threshold")
    fake.gone.add(20)
    fake.ws_mib = after_mib
    fake.settle()
    assert fake.actions()[0] == (20, "SIGTERM", outcome)
    assert (fake.sent[-1][0] == 21) == (outcome == "not_enough")


def test_several_victims_when_one_is_not_enough_and_never_more_than_the_bound() -> None:
    fake = Fake(max_victims=3, cooldown_s=10)
    many_idle_sessions(fake)
    fake.ws_mib = 280  # stays above the threshold whatever is freed: a leak elsewhere
    fake.guard.on_pressure("threshold")
    for pid in (20, 21, 22):
        assert fake.sent[-1] == (pid, "SIGTERM")
        fake.gone.add(pid)
        fake.tick()  # seen released, not yet settled: nothing new
        assert fake.sent[-1] == (pid, "SIGTERM")
        fake.settle()
    assert fake.actions() == [(p, "SIGTERM", "not_enough") for p in (20, 21, 22)]
    assert fake.guard.state == COOLDOWN and len(fake.sent) == 3
    fake.guard.on_pressure("threshold")
    assert len(fake.sent) == 3


def test_a_cancelled_query_that_gave_its_memory_back_is_not_terminated() -> None:
    """One of several active queries: its cancel worked (its memory is back), so the next
    one is cancelled, and nobody's session ends."""
    fake = Fake(grace_s=0.5)
    fake.children = [
        child(11, "postgres: a db [local] SELECT", 40),
        child(12, "postgres: b db [local] SELECT", 30),
    ]
    fake.ws_mib = 285
    fake.guard.on_pressure("threshold")
    fake.children = [child(11, "postgres: a db [local] SELECT", 2), fake.children[1]]
    fake.ws_mib = 275
    fake.settle()
    assert fake.sent == [(11, "SIGINT"), (12, "SIGINT")]
    fake.children = [fake.children[0], child(12, "postgres: b db [local] SELECT", 2)]
    fake.ws_mib = 262
    fake.settle()
    assert fake.actions() == [(11, "SIGINT", "not_enough"), (12, "SIGINT", "relieved")]


def test_kernel_choice_follows_oom_badness() -> None:
    limit = 300 * MIB
    members = [
        Member(1, 100 * MIB, 0, 0, -900),  # a protected postmaster: far behind
        Member(2, 20 * MIB, 5 * MIB, 1 * MIB, 0),
        Member(3, 10 * MIB, 0, 0, 100),  # 10 MiB + 30 MiB of adj
        Member(4, 500 * MIB, 0, 0, -1000),  # never
    ]
    assert kernel_choice(members, limit) == members[2]
    assert members[0].badness(limit) == 100 * MIB - 900 * (limit // 1000)
    assert members[3].badness(limit) is None
    assert kernel_choice([members[3]], limit) is None
    assert kernel_choice([Member(9, MIB, 0, 0, 0), Member(8, MIB, 0, 0, 0)], limit).pid == 8  # type: ignore[union-attr]


def test_a_victim_gone_before_the_signal_leads_to_the_next_one() -> None:
    fake = Fake()
    fake.ws_mib = 280
    answers = iter([Sent.GONE, Sent.SENT])

    def send(pid: int, start: int, signum: signal.Signals) -> Sent:
        answer = next(answers)
        fake.children = [c for c in fake.children if c.pid != pid]
        if answer is Sent.SENT:
            fake.sent.append((pid, signum.name))
        return answer

    fake.guard._send = send
    fake.guard.on_pressure("threshold")
    assert fake.actions() == [(11, "SIGINT", "gone")]
    assert fake.sent == [(12, "SIGINT")]


def test_denied_is_reported_with_the_fix(caplog: pytest.LogCaptureFixture) -> None:
    fake = Fake()
    fake.answer = Sent.DENIED
    fake.ws_mib = 280
    fake.guard.on_pressure("threshold")
    assert fake.actions() == [(11, "SIGINT", "denied")]
    assert fake.guard.state == COOLDOWN


def test_kernel_oom_is_counted_and_status_shows_the_state() -> None:
    fake = Fake()
    fake.guard.on_pressure("oom")
    status = fake.guard.status()
    assert status["kernel_oom_events"] == 1 and status["state"] == WATCHING
    assert status["pressure_events"] == 1 and status["actions"] == 0


def test_os_errors_while_sampling_are_not_pressure() -> None:
    fake = Fake()

    def broken() -> Sample:
        raise FileNotFoundError("cgroup removed")

    fake.guard._sample = broken
    fake.guard.on_pressure("threshold")
    assert fake.sent == []


# --- metrics ---------------------------------------------------------------------------------


def test_guard_metrics_come_from_the_totals_and_the_reports() -> None:
    from prometheus_client import generate_latest

    from watcher.guard import Guards
    from watcher.metrics import Metrics

    guards = Guards(GuardSettings(), ProcFS())
    metrics = Metrics()
    metrics.attach_guard(guards)
    guards._on_report("guard_pressure", {"postmaster": 1, "signal": "threshold"})
    guards._on_report("guard_pressure", {"postmaster": 1, "signal": "oom"})
    action = {
        "signal": "SIGINT",
        "outcome": "relieved",
        "event_to_signal_us": 1200,
        "relief_ms": 5.0,
    }
    guards._on_report("guard_action", action)
    guards._on_report("guard_action", {**action, "outcome": "dry_run", "relief_ms": None})
    text = generate_latest(metrics.registry).decode()
    guards.close()
    assert 'pgoom_guard_pressure_events_total{signal="threshold"} 1.0' in text
    assert "pgoom_guard_kernel_oom_events_total 1.0" in text
    assert 'pgoom_guard_actions_total{outcome="relieved",signal="SIGINT"} 1.0' in text
    assert 'pgoom_guard_actions_total{outcome="dry_run",signal="none"} 1.0' in text
    assert 'pgoom_guard_relief_seconds_count{signal="SIGINT"} 1.0' in text
    assert "pgoom_guard_reaction_seconds_count 1.0" in text  # the dry run sent nothing
    assert 'pgoom_guard_postmasters{state="watching"} 0.0' in text


# --- the state file pgoom status reads ----------------------------------------------------------


def test_state_is_published_and_read_back(tmp_path: Path) -> None:
    from watcher.commands.status import guard_text
    from watcher.guard.state import read_states, remove_state, write_state

    directory = str(tmp_path / "run")
    fake = Fake()
    fake.ws_mib = 280
    fake.guard.on_pressure("threshold")
    assert write_state([fake.guard.status()], directory)
    states = read_states(directory)
    assert list(states) == [100]
    text = guard_text(states[100])
    assert text.startswith("acting, 280/300 MiB, 0 action(s)")
    remove_state(directory)
    assert read_states(directory) == {}


def test_state_dir_writable_by_others_is_not_used(tmp_path: Path) -> None:
    from watcher.guard.state import write_state

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    assert not write_state([], str(shared))
    assert list(shared.iterdir()) == []


def test_a_dead_writer_s_file_is_ignored(tmp_path: Path) -> None:
    from watcher.guard.state import read_states

    (tmp_path / "guard-999999999.json").write_text('{"postmasters": [{"postmaster": 5}]}')
    (tmp_path / "guard-1.json").symlink_to(tmp_path / "guard-999999999.json")  # never followed
    assert read_states(str(tmp_path)) == {}


def test_v1_thresholds_every_percent_up_to_the_limit() -> None:
    from watcher.guard.pressure import v1_thresholds

    levels = v1_thresholds(270 * MIB, 300 * MIB)
    assert levels[0] == 270 * MIB and levels[-1] < 300 * MIB
    assert len(levels) == 10  # 3 MiB apart
    assert v1_thresholds(100, 0) == [100]
