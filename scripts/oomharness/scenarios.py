"""The OOM scenarios and the restart storm. Each run provokes a real memory-cgroup OOM and
records what the kernel did (oom_kill counter, /dev/kmsg), which process it chose, every
process's score, whether the postmaster survived, how long until PostgreSQL accepted a
connection again, and whether rows committed before the OOM are all still there."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

from scripts.oomharness import kmsg
from scripts.oomharness.cgroup import MemoryCgroup, enter
from scripts.oomharness.pgcluster import HarnessCluster, Session
from tests.support.pg import Template, alive, read_score, wait_for
from tests.support.watcher import PGOOM, Watcher
from watcher.match import role_of

MANY_BACKENDS = "many-backends"
BIG_QUERY = "big-query"
HOG = "non-postgres-hog"
SCENARIOS = (MANY_BACKENDS, BIG_QUERY, HOG)
UNPROTECTED = "unprotected"
PROTECTED = "protected"
GUARDED = "guarded"  # protected, and `pgoom watch --guard`
WATCHED = (PROTECTED, GUARDED)  # the modes with a pgoom watch running
GUARD_RELIEF_PCT = 85  # pgoom watch --guard's default threshold (90 %) minus its margin
GUARD_SETTLE_S = 1.5  # the guard's default grace (1 s), and its log line

# PostgreSQL's line when a child died by a signal and it resets every session.
CRASH_RESTART = "all server processes terminated; reinitializing"
_GUARD_LINE = re.compile(
    # Greedy up to the line's last event_to_signal_us: the title before it is the backend's
    # process title, which a client can fill with a field of that name.
    r"guard: sent (SIG\w+) to client backend pid=(\d+) [^\n]*event_to_signal_us=\d+: ([^\n]*)"
)

# Tens of millions of rows streamed through a targetlist SRF (a FROM-clause function scan
# would first materialize them in a tuplestore on disk): array_agg's state doubles until
# one repalloc crosses the cgroup's limit.
BIG_QUERY_SQL = "select array_length(array_agg(g), 1) from (select generate_series(1, {rows}) g) s;"

# A process that is not PostgreSQL, in the same cgroup: grows by touched 1 MiB blocks (so
# they are charged at once) up to a bound, then exits 3 so a run without an OOM ends.
HOG_CODE = """
import sys
blocks = []
for _ in range(int(sys.argv[1])):
    blocks.append(b"\\x01" * (1 << 20))
sys.exit(3)
"""

_PROTECTED_LINE = re.compile(r"protected postmaster pid=(\d+) .*?latency_us=(\d+|-)")


@dataclass
class Config:
    limit_mb: int = 300
    hold_mb: int = 0  # MiB each idle backend holds (scenarios 1 and 3); 0: calibrate
    max_sessions: int = 55  # below max_connections (60) minus superuser_reserved (3)
    hog_neighbours: int = 10
    big_query_rows: int = 100_000_000
    rows_per_run: int = 10_000
    score: int = 0  # what pgoom sets the postmaster to
    children_score: int = 1000  # PG_OOM_ADJUST_VALUE
    launcher_score: int = 1000  # the parent's score (a BestEffort pod's)
    recovery_limit_s: float = 2.0
    protect_timeout_s: float = 10.0
    recovery_timeout_s: float = 30.0
    group_kill: str = "auto"  # pgoom watch --group-kill
    bystanders: int = 2  # idle sessions opened before every incident, checked after it
    guard_timeout_s: float = 10.0  # guarded: how long to wait for the guard or the kernel


@dataclass
class Victim:
    pid: int
    name: str
    role: str
    oom_score_adj: int


@dataclass
class RunResult:
    scenario: str
    mode: str
    index: int
    oom_kills: int = 0
    victims: list[Victim] = field(default_factory=list)
    postmaster_survived: bool = False
    recovery_s: Optional[float] = None  # OOM kill -> a new connection succeeds
    refused: str = ""  # the connection error seen right after the kill, if any
    rows_expected: int = 0
    rows_counted: Optional[int] = None
    sessions_before_oom: int = 0
    hold_mb: int = 0
    baseline_resets: int = 0  # times another process had lowered the unprotected postmaster
    postmaster_adj_at_oom: Optional[int] = None  # from the kernel's task dump
    usage_mb_before: float = 0.0
    scores: dict[str, dict[int, int]] = field(default_factory=dict)  # role -> {adj: count}
    rss_mb: dict[str, float] = field(default_factory=dict)  # role -> largest RSS seen
    kernel_lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    view: str = "the harness's last look at /proc before the OOM"
    oom_group_after: Optional[str] = None  # memory.oom.group after the run (v2): ungroup's work
    sessions_open: int = 0  # connections open before the incident (bystanders included)
    sessions_lost: Optional[int] = None  # of those, broken after it
    crash_restarts: Optional[int] = None  # PostgreSQL's "reinitializing" lines in this run
    guard_actions: list[str] = field(default_factory=list)  # "SIGINT relieved in 4.1 ms", ...
    guard_first: Optional[bool] = None  # guarded: the guard acted and the kernel killed nothing

    @property
    def rows_lost(self) -> Optional[int]:
        if self.rows_counted is None:
            return None
        return self.rows_expected - self.rows_counted


@dataclass
class StormCycle:
    index: int
    kind: str
    pid: int
    watcher_latency_us: Optional[int]  # pgoom's own: exec event -> score written
    seen_to_protected_ms: Optional[float]  # harness view: PID in postmaster.pid -> at target
    start_to_protected_ms: Optional[float]  # kill -9 path: launch -> at target
    protected: bool


@dataclass
class Group:
    """All runs of one scenario in one mode, with the cluster-start protection latencies."""

    scenario: str
    mode: str
    runs: list[RunResult] = field(default_factory=list)
    start_protect_ms: list[float] = field(default_factory=list)
    verify_codes: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    watcher_log: str = ""
    postgres_log_tail: str = ""


class OomMonitor:
    """Polls the group's oom_kill counter every 2 ms in a thread, stamping each increase:
    the start of the recovery clock, within a few milliseconds of the kill."""

    def __init__(self, cgroup: MemoryCgroup) -> None:
        self.cgroup = cgroup
        self.base = cgroup.oom_kills()
        self.count = self.base
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.cgroup.oom_kills()
            if now > self.count:
                stamp = time.monotonic()
                self.times.extend([stamp] * (now - self.count))
                self.count = now
            self._stop.wait(0.002)

    @property
    def kills(self) -> int:
        return self.count - self.base

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Harness:
    def __init__(
        self, template: Template, cgroup: MemoryCgroup, config: Config, log: Callable[[str], None]
    ) -> None:
        self.template = template
        self.cgroup = cgroup
        self.config = config
        self.log = log
        self.kernel = kmsg.KernelLog()
        # What is running now, for close() when a signal cuts a run short.
        self.live_watchers: list[Watcher] = []
        self.live_clusters: list[HarnessCluster] = []

    def close(self) -> None:
        """Stop what an interrupted run left: watchers (outside the cgroup) and clusters
        (data and socket directories). The cgroup's own processes die with the cgroup."""
        for watcher in self.live_watchers:
            watcher.stop()
        for cluster in self.live_clusters:
            self._destroy(cluster)
        self.live_watchers.clear()
        self.live_clusters.clear()
        self.kernel.close()

    # --- one cluster per (scenario, mode) --------------------------------------------------

    @contextmanager
    def cluster(
        self, mode: str, group: Group
    ) -> Iterator[tuple[HarnessCluster, Optional[Watcher]]]:
        cluster = HarnessCluster(
            self.template,
            self.cgroup.procs_file,
            launcher_score=self.config.launcher_score,
            children_score=self.config.children_score,
        )
        self.live_clusters.append(cluster)
        watcher: Optional[Watcher] = None
        try:
            if mode in WATCHED:
                # A real `pgoom watch`, outside the cgroup, naming only this cluster.
                # The --data-dir rule makes every postgres process a candidate, so pgoom's
                # fallback (any postmaster, when no pattern matches) never triggers and
                # other people's clusters on a shared host are left alone.
                watcher = Watcher(
                    "--group-kill",
                    self.config.group_kill,
                    "--score",
                    str(self.config.score),
                    "--pattern",
                    cluster.pattern,
                    "--data-dir",
                    cluster.data_dir,
                    *(["--guard"] if mode == GUARDED else []),
                )
                self.live_watchers.append(watcher)
                watcher.wait_ready(30)
            self.start(cluster, group)
            cluster.psql(
                "create table committed_rows (run int not null, i int not null)", timeout_s=30
            )
            yield cluster, watcher
        finally:
            if watcher is not None:
                watcher.stop()
                self.live_watchers.remove(watcher)
                group.watcher_log = watcher.text()
            group.postgres_log_tail = _tail(cluster.log_path, 20)
            self._destroy(cluster)
            self.live_clusters.remove(cluster)

    def start(self, cluster: HarnessCluster, group: Group) -> None:
        launched = time.monotonic()
        # The PID started is the postmaster's: after a kill postmaster.pid still names the
        # dead one until the new postmaster rewrites it (found on cgroup v2, where the
        # group kill takes the protected postmaster too and the harness restarts it).
        pm = cluster.start(wait=False)
        if group.mode in WATCHED:
            protected_at = self._wait_protected(pm)
            if protected_at is None:
                group.problems.append(
                    f"postmaster {pm} not protected within {self.config.protect_timeout_s} s"
                )
            else:
                group.start_protect_ms.append((protected_at - launched) * 1000)
        cluster.wait_ready(60)
        group.verify_codes.append(self.verify(cluster, 10 if group.mode in WATCHED else 0))

    def _wait_protected(self, pm: int) -> Optional[float]:
        try:
            wait_for(
                lambda: read_score(pm) <= self.config.score, self.config.protect_timeout_s, 0.001
            )
        except (TimeoutError, FileNotFoundError, ProcessLookupError):
            return None
        return time.monotonic()

    def verify(self, cluster: HarnessCluster, timeout_s: float) -> int:
        """`pgoom verify` as a CI job would run it: 0 protected, 1 not, 3 not found."""
        done = subprocess.run(
            [
                *PGOOM,
                "verify",
                "--score",
                str(self.config.score),
                "--pattern",
                cluster.pattern,
                "--timeout",
                str(timeout_s),
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s + 30,
            check=False,
        )
        return done.returncode

    def _destroy(self, cluster: HarnessCluster) -> None:
        try:
            cluster.destroy()
        except (TimeoutError, OSError) as err:
            self.log(f"warning: stopping {cluster.name}: {err}")
        # Whatever is left in the cgroup was started by this harness: by PID, SIGKILL.
        for pid in self.cgroup.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            wait_for(lambda: not self.cgroup.pids(), 15, 0.05, what="cgroup to empty")
        except TimeoutError as err:
            self.log(f"warning: {err}")

    # --- the pieces of a run ---------------------------------------------------------------

    def write_rows(self, cluster: HarnessCluster, run: RunResult, total_before: int) -> int:
        n = self.config.rows_per_run
        cluster.psql(
            f"insert into committed_rows select {run.index}, g from generate_series(1, {n}) g",
            timeout_s=60,
        )
        run.rows_expected = total_before + n
        return run.rows_expected

    def snapshot(self, pm: int, hog: Optional[int] = None) -> dict[int, tuple[str, int, float]]:
        """pid -> (role, oom_score_adj, RSS MiB) for every process in the cgroup."""
        out: dict[int, tuple[str, int, float]] = {}
        for pid in self.cgroup.pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
                adj = read_score(pid)
                rss_kib = 0
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            rss_kib = int(line.split()[1])
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue
            if pid == pm:
                role = "postmaster"
            elif pid == hog:
                role = "hog"
            else:
                role = role_of(argv, False)
            out[pid] = (role, adj, rss_kib / 1024)
        return out

    def record(self, run: RunResult, snap: dict[int, tuple[str, int, float]]) -> None:
        scores: dict[str, Counter[int]] = {}
        for role, adj, rss_mb in snap.values():
            scores.setdefault(role, Counter())[adj] += 1
            run.rss_mb[role] = round(max(run.rss_mb.get(role, 0.0), rss_mb), 1)
        run.scores = {role: dict(sorted(c.items())) for role, c in scores.items()}

    def collect_kills(
        self, run: RunResult, monitor: OomMonitor, snap: dict[int, tuple[str, int, float]]
    ) -> None:
        """Name the victims from the kernel's lines (bounded wait: the printk follows the
        counter's increase)."""
        lines: list[str] = []
        report = kmsg.OomReport()

        def complete() -> bool:
            nonlocal report
            lines.extend(self.kernel.read())
            # The pids too: the kernel rate-limits its OOM report (10 per 5 s), and a report
            # it suppressed leaves the "Killed process" line without the constraint line
            # that names the cgroup (seen in 1 of 20 back-to-back hog runs).
            report = kmsg.parse(lines, self.cgroup.kernel_path, set(snap))
            return len(report.kills) >= monitor.kills

        if self.kernel.available:
            try:
                wait_for(complete, 3, 0.02)
            except TimeoutError:
                run.problems.append("kernel log had fewer kills than the oom_kill counter")
        run.oom_kills = monitor.kills
        if report.tasks:
            self._record_kernel_view(run, report, snap)
        pm = next((pid for pid, v in snap.items() if v[0] == "postmaster"), None)
        if pm is not None and pm in report.tasks:
            adj = report.tasks[pm]["oom_score_adj"]
            run.postmaster_adj_at_oom = adj if isinstance(adj, int) else None
        run.kernel_lines = report.lines[-6:]
        for kill in report.kills:
            role = (
                snap[kill.pid][0]
                if kill.pid in snap
                else ("backend" if kill.comm == "postgres" else kill.comm)
            )
            run.victims.append(Victim(kill.pid, kill.comm, role, kill.oom_score_adj))
        if not self.kernel.available and monitor.kills:
            run.victims.append(Victim(0, "?", "unknown (no /dev/kmsg)", 0))

    def _record_kernel_view(
        self, run: RunResult, report: kmsg.OomReport, snap: dict[int, tuple[str, int, float]]
    ) -> None:
        """Scores and sizes as the kernel saw them when it chose (its task dump), which
        beats the harness's last look at /proc: the hog, for one, grew after that look."""
        page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        scores: dict[str, Counter[int]] = {}
        sizes: dict[str, float] = {}
        for pid, task in report.tasks.items():
            name = str(task["name"])
            role = snap[pid][0] if pid in snap else ("backend" if name == "postgres" else name)
            adj = task["oom_score_adj"]
            pages = task["rss_pages"]
            if not isinstance(adj, int) or not isinstance(pages, int):
                continue
            scores.setdefault(role, Counter())[adj] += 1
            sizes[role] = round(max(sizes.get(role, 0.0), pages * page_mb), 1)
        run.scores = {role: dict(sorted(c.items())) for role, c in scores.items()}
        run.rss_mb = sizes
        run.view = "kernel task dump at the first OOM kill"

    def recover(
        self, cluster: HarnessCluster, run: RunResult, pm: int, monitor: OomMonitor, group: Group
    ) -> None:
        """After the kill: did the postmaster survive, when did connections work again, and
        (when it died) restart it by hand as an operator would have to."""
        kill_time = monitor.times[0] if monitor.times else time.monotonic()
        deadline = kill_time + self.config.recovery_timeout_s
        # Probe at once, before anything else is looked at: the clock started at the kill.
        while alive(pm) and cluster.pidfile_pid() == pm:
            ok, _ = cluster.try_connect(5)
            if ok and alive(pm):
                run.postmaster_survived = True
                run.recovery_s = round(time.monotonic() - kill_time, 3)
                return
            if time.monotonic() > deadline:
                run.postmaster_survived = alive(pm)
                run.problems.append(f"no connection within {self.config.recovery_timeout_s} s")
                return
            time.sleep(0.01)
        run.postmaster_survived = False
        ok, error = cluster.try_connect(5)
        run.refused = "accepted?!" if ok else error
        leftovers = [p for p in self.cgroup.pids() if p != pm]
        cluster.kill_leftovers(leftovers)
        cluster.wait_postmaster_gone(pm)
        self.start(cluster, group)

    def count_rows(self, cluster: HarnessCluster, run: RunResult) -> None:
        try:
            run.rows_counted = int(
                cluster.psql("select count(*) from committed_rows", timeout_s=60)
            )
        except (subprocess.SubprocessError, ValueError) as err:
            run.problems.append(f"cannot count rows: {err}")

    # --- scenarios -------------------------------------------------------------------------

    def run_group(self, scenario: str, mode: str, runs: int) -> Group:
        group = Group(scenario, mode)
        try:
            with self.cluster(mode, group) as (cluster, watcher):
                total = 0
                for index in range(1, runs + 1):
                    run = RunResult(scenario, mode, index)
                    total = self.write_rows(cluster, run, total)
                    self.one_run(cluster, run, group, watcher)
                    self.count_rows(cluster, run)
                    group.runs.append(run)
                    self.log(describe(run))
        except (OSError, subprocess.SubprocessError, TimeoutError, AssertionError) as err:
            group.problems.append(failure_text(err))
            self.log(f"{scenario}/{mode}: aborted: {err}")
        return group

    def one_run(
        self,
        cluster: HarnessCluster,
        run: RunResult,
        group: Group,
        watcher: Optional[Watcher] = None,
    ) -> None:
        pm = cluster.postmaster_pid()
        self.kernel.read()  # drop older records: only this run's lines are parsed
        log_offset = _size(cluster.log_path)
        guard_offset = len(watcher.text()) if watcher is not None else 0
        guarded = run.mode == GUARDED and watcher is not None

        def guard_acted() -> bool:
            return (
                guarded and watcher is not None and "guard: sent" in watcher.text()[guard_offset:]
            )

        monitor = OomMonitor(self.cgroup)
        # Sessions that do nothing but exist: what every other client of the database is.
        bystanders = [Session(cluster) for _ in range(self.config.bystanders)]
        for bystander in bystanders:
            bystander.run("select 1;", 30)
        sessions: list[Session] = []
        hog: Optional[subprocess.Popen[bytes]] = None
        snap = self.snapshot(pm)
        try:
            if run.scenario == MANY_BACKENDS:
                snap = self._fill(
                    cluster,
                    run,
                    pm,
                    monitor,
                    sessions,
                    self.config.max_sessions,
                    stop=guard_acted,
                    settle=guard_acted if guarded else None,
                )
            elif run.scenario == BIG_QUERY:
                self._keep_baseline_score(run, pm)
                session = Session(cluster)
                sessions.append(session)
                session.run("select 1;", 30)
                run.sessions_open = len(bystanders) + len(sessions)
                done = session.run(BIG_QUERY_SQL.format(rows=self.config.big_query_rows), 180)
                if done.ok:
                    run.problems.append(f"the big query finished without an OOM: {done.lines}")
            elif run.scenario == HOG:
                snap = self._fill(
                    cluster, run, pm, monitor, sessions, self.config.hog_neighbours, push=False
                )
                if monitor.kills == 0:
                    self._keep_baseline_score(run, pm)
                    hog = self._start_hog()
                    snap = self.snapshot(pm, hog.pid)
                    try:
                        hog.wait(timeout=120)
                    except subprocess.TimeoutExpired:
                        run.problems.append("the hog ran for 120 s without an OOM")
            if run.scenario != BIG_QUERY:
                run.sessions_open = len(bystanders) + len(sessions)
            self.record(run, snap)
            if guarded:
                wait_for(
                    lambda: monitor.kills > 0 or guard_acted(),
                    self.config.guard_timeout_s,
                    0.01,
                    what="the guard or the kernel",
                )
                assert watcher is not None
                self._wait_guard_done(watcher, guard_offset)
            if monitor.kills == 0 and not guarded:
                wait_for(lambda: monitor.kills > 0, 5, 0.01, what="an OOM kill")
            if monitor.kills:
                self.recover(cluster, run, pm, monitor, group)
            else:
                run.postmaster_survived = alive(pm)
            run.oom_group_after = self._oom_group()
            self.collect_kills(
                run, monitor, {**snap, **({hog.pid: ("hog", 0, 0.0)} if hog else {})}
            )
            if guarded:
                assert watcher is not None
                run.guard_actions = guard_actions(watcher.text()[guard_offset:])
                run.guard_first = bool(run.guard_actions) and run.oom_kills == 0
            # Which connections opened before the incident still work? A session whose
            # backend was terminated (or reset by a crash restart) has lost its psql: a
            # non-interactive psql exits when its connection breaks.
            run.sessions_lost = sum(
                1 for s in bystanders + sessions if not s.run("select 1;", 15).ok
            )
            run.crash_restarts = _read_from(cluster.log_path, log_offset).count(CRASH_RESTART)
        except TimeoutError as err:
            run.problems.append(str(err))
        finally:
            monitor.stop()
            for session in bystanders + sessions:
                session.close()
            if hog is not None and hog.poll() is None:
                hog.kill()
                hog.wait()

    def _oom_group(self) -> Optional[str]:
        try:
            with open(f"{self.cgroup.path}/memory.oom.group") as f:
                return f.read().strip()
        except OSError:
            return None  # v1, or a kernel without it

    def _wait_guard_done(self, watcher: Watcher, offset: int) -> None:
        """Until the guard's last action has its outcome: a SIGINT without relief is
        followed by a SIGTERM line after the grace."""

        def done() -> bool:
            actions = guard_actions(watcher.text()[offset:])
            return not actions or not actions[-1].startswith("SIGINT no relief")

        try:
            wait_for(done, self.config.guard_timeout_s, 0.01, what="the guard's escalation")
        except TimeoutError:
            pass

    def _fill(
        self,
        cluster: HarnessCluster,
        run: RunResult,
        pm: int,
        monitor: OomMonitor,
        sessions: list[Session],
        limit: int,
        push: bool = True,
        stop: Callable[[], bool] = lambda: False,
        settle: Optional[Callable[[], bool]] = None,
    ) -> dict[int, tuple[str, int, float]]:
        """Open sessions one by one, each growing its backend in small steps to hold_mb: no
        single backend ever outgrows the postmaster, so when the last step pushes the group
        over its limit, the postmaster is the largest process. Stops at the first kill.
        With `push`, if `limit` sessions fit, the last one keeps growing until the OOM.
        `settle` (guarded runs): near the guard's threshold (at its relief level or above:
        the query that just ended may have crossed it and been relieved), the next session
        waits until that is true or the guard's grace has passed, as a client waits for its
        last query: the guard logs an action once its outcome is known, milliseconds after
        the signal, and a session opened in between would be a second incident, not this
        one. Each run measures one incident."""
        snap = self.snapshot(pm)
        hold_mb = self.config.hold_mb
        for _ in range(limit):
            session = Session(cluster)
            sessions.append(session)
            if hold_mb == 0:
                hold_mb = self._calibrate(session, pm)
            run.hold_mb = hold_mb
            # Per row the repeat() result is freed and the setting's copy stays. Steps of
            # 128 KiB: with 1 MiB steps the backend's peak RSS ran 3 MiB above where it
            # settles, and the backend doing the last step outgrew the postmaster.
            done = session.run(
                "select count(set_config('pgoom.hold' || i, repeat('x', 131072), false)) "
                f"from generate_series(1, {hold_mb * 8}) i;",
                60,
            )
            if settle is not None and self.cgroup.usage_bytes() >= self._guard_relief_bytes():
                try:
                    wait_for(settle, GUARD_SETTLE_S, 0.01, what="the guard's outcome")
                except TimeoutError:
                    pass  # the guard did nothing: keep pushing, the kernel will decide
            if monitor.kills or not done.ok or stop():
                break
            self._keep_baseline_score(run, pm)
            run.sessions_before_oom = len(sessions)
            run.usage_mb_before = round(self.cgroup.usage_bytes() / 2**20, 1)
            snap = self.snapshot(pm)
        else:
            if push and sessions and not stop():
                # All sessions fit (a small postmaster forces a small hold): one more,
                # unbounded allocation. Its backend becomes the largest process.
                run.notes.append(f"{limit} sessions fit: pushed with one large allocation")
                sessions[-1].run(
                    "select count(set_config('pgoom.push' || i, repeat('x', 131072), false)) "
                    f"from generate_series(1, {self.config.limit_mb * 8}) i;",
                    120,
                )
        return snap

    def _guard_relief_bytes(self) -> int:
        return int(self.config.limit_mb * (1 << 20) * GUARD_RELIEF_PCT / 100)

    def _calibrate(self, session: Session, pm: int) -> int:
        """--hold-mb 0: size the hold so that a full backend stays ~4 MiB below the
        postmaster's RSS (measured here: PostgreSQL versions and builds differ)."""
        done = session.run("select pg_backend_pid();", 30)
        try:
            backend = int(done.lines[-1])
            base_mb = rss_mb(backend)
            pm_mb = rss_mb(pm)
        except (IndexError, ValueError, OSError):
            return 5
        return max(1, min(20, int(pm_mb - base_mb - 4)))

    def _keep_baseline_score(self, run: RunResult, pm: int) -> None:
        """Unprotected means the launcher's score. Another pgoom on a shared host (--all or
        its fallback) may lower it: put it back (raising is always allowed) and say so."""
        if run.mode != UNPROTECTED:
            return
        try:
            if read_score(pm) != self.config.launcher_score:
                with open(f"/proc/{pm}/oom_score_adj", "w") as f:
                    f.write(str(self.config.launcher_score))
                run.baseline_resets += 1
        except OSError:
            pass

    def _start_hog(self) -> subprocess.Popen[bytes]:
        procs_file = self.cgroup.procs_file
        score = self.config.launcher_score
        uid, gid = self.template.uid, self.template.gid
        # The PostgreSQL user cannot always read the harness's own interpreter (a venv
        # under /root): it runs the system's python3 when there is one, else runs as root.
        python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
        drop = python != sys.executable

        def preexec() -> None:
            enter(procs_file)
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write(str(score))
            if drop:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)

        bound_mb = self.config.limit_mb * 2
        return subprocess.Popen(
            [python, "-c", HOG_CODE, str(bound_mb)],
            preexec_fn=preexec,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    # --- restart storm ---------------------------------------------------------------------

    def storm(self, cycles: int) -> tuple[Group, list[StormCycle]]:
        group = Group("restart-storm", PROTECTED)
        results: list[StormCycle] = []
        try:
            with self.cluster(PROTECTED, group) as (cluster, watcher):
                assert watcher is not None
                for index in range(1, cycles + 1):
                    kind = "kill -9 + start" if index % 2 else "pg_ctl restart"
                    results.append(self._storm_cycle(cluster, watcher, index, kind))
                    cycle = results[-1]
                    self.log(
                        f"storm {index}/{cycles} {kind}: pid {cycle.pid} "
                        f"{'protected' if cycle.protected else 'NOT PROTECTED'} "
                        f"watcher {cycle.watcher_latency_us} us"
                    )
        except (OSError, subprocess.SubprocessError, TimeoutError, AssertionError) as err:
            group.problems.append(failure_text(err))
            self.log(f"restart storm: aborted: {err}")
        return group, results

    def _storm_cycle(
        self, cluster: HarnessCluster, watcher: Watcher, index: int, kind: str
    ) -> StormCycle:
        old = cluster.postmaster_pid()
        poller = PidfilePoller(cluster, old, self.config.score)
        launched: Optional[float] = None
        try:
            if kind.startswith("kill"):
                children = cluster.backend_pids()
                os.kill(old, signal.SIGKILL)
                cluster.wait_postmaster_gone(old)
                cluster.kill_leftovers(children)
                launched = time.monotonic()
                cluster.start(wait=False)
            else:
                cluster.pg_ctl("restart", "-m", "fast")
                if cluster.proc is not None:
                    cluster.proc.poll()  # reap the first postmaster if it was our child
            new = wait_for(lambda: poller.pid, 30, 0.005, what="a new postmaster")
            assert isinstance(new, int)
            protected = self._wait_protected(new) is not None
            cluster.wait_ready(60)
        finally:
            poller.stop()
        latency_us = watcher_latency_us(watcher.text(), new)
        seen_ms = None
        if poller.seen_at is not None and poller.protected_at is not None:
            seen_ms = max(0.0, (poller.protected_at - poller.seen_at) * 1000)
        start_ms = None
        if launched is not None and poller.protected_at is not None:
            start_ms = (poller.protected_at - launched) * 1000
        return StormCycle(index, kind, new, latency_us, seen_ms, start_ms, protected)


class PidfilePoller:
    """Watches postmaster.pid every millisecond for a PID other than `old`, stamping when it
    appears and when its score first reads at or below the target."""

    def __init__(self, cluster: HarnessCluster, old: int, score: int) -> None:
        self.cluster = cluster
        self.old = old
        self.score = score
        self.pid: Optional[int] = None
        self.seen_at: Optional[float] = None
        self.protected_at: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.protected_at is None:
            if self.pid is None:
                try:
                    pid = self.cluster.pidfile_pid()
                except (OSError, ValueError):
                    pid = None
                if pid is not None and pid != self.old:
                    self.seen_at = time.monotonic()
                    self.pid = pid
            if self.pid is not None:
                try:
                    if read_score(self.pid) <= self.score:
                        self.protected_at = time.monotonic()
                except (OSError, ValueError):
                    pass
            self._stop.wait(0.001)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def guard_actions(log_text: str) -> list[str]:
    """The guard's actions in a pgoom log, as 'SIGINT relieved in 4.1 ms'."""
    return [f"{m.group(1)} {m.group(3)}" for m in _GUARD_LINE.finditer(log_text)]


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _read_from(path: str, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _tail(path: str, lines: int) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def watcher_latency_us(log_text: str, pid: int) -> Optional[int]:
    for match in _PROTECTED_LINE.finditer(log_text):
        if int(match.group(1)) == pid and match.group(2) != "-":
            return int(match.group(2))
    return None


def failure_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    output = getattr(err, "output", None) or getattr(err, "stdout", None)
    if isinstance(output, bytes):
        output = output.decode("utf-8", "replace")
    if output:
        text += " -- " + " | ".join(str(output).strip().splitlines()[-3:])
    return text


def describe(run: RunResult) -> str:
    victims = ", ".join(f"{v.role} {v.pid} (adj {v.oom_score_adj})" for v in run.victims) or "none"
    recovery = f"{run.recovery_s:.3f} s" if run.recovery_s is not None else "-"
    problems = f" PROBLEMS: {'; '.join(run.problems)}" if run.problems else ""
    problems += f" ({'; '.join(run.notes)})" if run.notes else ""
    return (
        f"{run.scenario}/{run.mode} #{run.index}: kills {run.oom_kills}, victims {victims}, "
        f"postmaster {'survived' if run.postmaster_survived else 'KILLED'}, "
        f"recovery {recovery}, rows lost {run.rows_lost}, "
        f"sessions lost {run.sessions_lost}/{run.sessions_open}, "
        f"crash restarts {run.crash_restarts}"
        + (f", guard: {'; '.join(run.guard_actions) or 'nothing'}" if run.mode == GUARDED else "")
        + (f", refused: {run.refused}" if run.refused else "")
        + (
            f", postmaster adj at OOM {run.postmaster_adj_at_oom}"
            if run.postmaster_adj_at_oom is not None
            else ""
        )
        + (f", baseline score reset {run.baseline_resets}x" if run.baseline_resets else "")
        + problems
    )
