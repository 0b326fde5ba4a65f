"""The guard's figures on the real kernel: a cgroup v1 (or v2) memory cgroup, PostgreSQL in
it, the guard (watcher.guard.Guards, the code `pgoom watch --guard` runs) in-process.

    flock /var/lock/pgoom-itest.lock .venv/bin/python scripts/benchmarks/guard.py \
        [--runs 20] [--churn-runs 10] [--hold-s 120] [--idle-s 20] [--limit-mb 300] \
        [--vmpressure-quiet-ms 50]

- baseline: `--baseline-runs` runaway queries nobody stops (the guard in dry run): the time
  from the guard's threshold to the kernel's OOM kill, the window the guard has.
- latency: `--runs` runaway queries (array_agg over a target-list generate_series, ~175 MB/s
  here): pressure event received -> signal sent (p50/p99), signal -> working set back below
  the relief level (threshold - 5 points), and the share of runs in which the guard acted
  and the kernel's OOM killer did not.
- under churn: `--churn-runs` runaway queries while a file read keeps the page cache at the
  limit (usage pinned there, the thresholds below it all crossed): the same figures.
- false positives: a session holding ~85 % of the limit for `--hold-s` seconds while other
  sessions run queries and a file read fills the page cache to the limit: actions (goal 0),
  and what the churn costs: the guard's wakeups per second, its CPU time, its pressure
  events by signal.
- `--vmpressure-quiet-ms`: how long the guard does not listen to memory.pressure_level after
  one of its wakeups (0: every wakeup, as before the limit; watcher/guard/pressure.py).
- idle: the guard's wakeups while memory is fine, over `--idle-s` seconds (goal 0).
A benchmark, not a test: it prints figures; timings on a busy 2-CPU machine are noisy.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from scripts.oomharness.cgroup import MemoryCgroup, enter
from scripts.oomharness.pgcluster import HarnessCluster, Session
from tests.support.guardloop import GuardLoop
from tests.support.pg import Template, children_of, wait_for
from watcher.guard import Guards, GuardSettings
from watcher.guard.memory import MemoryGroup, MemoryReader
from watcher.guard.pressure import VMPRESSURE_QUIET_S
from watcher.procfs import ProcFS

BIG_QUERY = "select array_length(array_agg(g), 1) from (select generate_series(1, 150000000) g) s;"
MIB = 1 << 20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_guard(
    memcg: MemoryCgroup, pm: int, quiet_s: float, dry_run: bool = False
) -> tuple[Guards, GuardLoop]:
    actions: list[dict[str, Any]] = []
    holder: list[GuardLoop] = []

    def report(name: str, fields: dict[str, Any]) -> None:
        if name == "guard_action":
            actions.append(fields)
            if holder and holder[0].on_action is not None:
                holder[0].on_action(fields)

    guards = Guards(
        GuardSettings(dry_run=dry_run), ProcFS(), report=report, vmpressure_quiet_s=quiet_s
    )
    group = MemoryGroup(memcg.version, memcg.path, memcg.path if memcg.version == 2 else None)
    guards.guard(pm, ProcFS().stat(pm).starttime_ticks, group)
    loop = GuardLoop(guards)
    loop.actions = actions
    holder.append(loop)
    return guards, loop


def churning(memcg: MemoryCgroup, tmp: str) -> subprocess.Popen[bytes]:
    """A file of the limit's size read in a loop inside the group, once the cache holds it
    up to the limit: page cache churning at the limit (stopped by PID by the caller)."""
    path = f"{tmp}/churn"
    size_mib = memcg.limit_bytes // MIB
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={size_mib}", "status=none"],
        preexec_fn=lambda: enter(memcg.procs_file),
        check=True,
    )
    reader = MemoryReader(MemoryGroup(memcg.version, memcg.path, memcg.path))
    proc = subprocess.Popen(
        ["sh", "-c", f'while :; do cat "{path}"; done'],
        stdout=subprocess.DEVNULL,
        preexec_fn=lambda: enter(memcg.procs_file),
    )
    wait_for(lambda: reader.sample().usage_bytes >= memcg.limit_bytes * 0.95, 30, 0.05, "the cache")
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    """The churn loop and its current cat: the shell's children first, by PID."""
    for child in children_of(proc.pid):
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    proc.wait()


def headroom(
    cluster: HarnessCluster, memcg: MemoryCgroup, runs: int, quiet_s: float
) -> list[float]:
    """The baseline, in the same run: how long the runaway query takes from the guard's
    threshold to the kernel's OOM kill when nobody stops it (the guard in dry run marks the
    threshold; the memcg's oom_kill counter, read every millisecond, marks the kill). The
    guard's event -> signal time is judged as a share of this window."""
    windows_ms: list[float] = []
    for index in range(1, runs + 1):
        window = _one_window(cluster, memcg, quiet_s)
        if window is None:
            print(f"baseline {index}/{runs}: no threshold mark or no kill")
            continue
        windows_ms.append(window)
        print(f"baseline {index}/{runs}: threshold -> OOM kill {window:.1f} ms", flush=True)
    if windows_ms:
        print(
            f"unguarded, threshold -> the kernel's OOM kill: p50 "
            f"{statistics.median(windows_ms):.1f} ms, min {min(windows_ms):.1f} ms "
            f"over {len(windows_ms)} runs"
        )
    return windows_ms


def _one_window(cluster: HarnessCluster, memcg: MemoryCgroup, quiet_s: float) -> Optional[float]:
    runaway = Session(cluster)
    runaway.run("select 1;")
    oom_before = memcg.oom_kills()
    marks: list[int] = []
    killed: list[int] = []
    guards, loop = start_guard(memcg, cluster.postmaster_pid(), quiet_s, dry_run=True)
    loop.on_action = lambda fields: marks.append(time.monotonic_ns())

    def watch_kill() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and memcg.oom_kills() == oom_before:
            time.sleep(0.001)
        killed.append(time.monotonic_ns())

    watcher = threading.Thread(target=watch_kill, daemon=True)
    watcher.start()
    try:
        runaway.run(BIG_QUERY, 120)
        watcher.join(125)
    finally:
        loop.stop()
        guards.close()
        runaway.close()
        cluster.wait_ready(60)
    if not (marks and killed and memcg.oom_kills() > oom_before):
        return None
    return (killed[0] - marks[0]) / 1e6


def latency(
    cluster: HarnessCluster,
    memcg: MemoryCgroup,
    runs: int,
    quiet_s: float,
    churn: bool = False,
    windows_ms: Optional[list[float]] = None,
) -> None:
    pm = cluster.postmaster_pid()
    event_us: list[float] = []
    relief_ms: list[float] = []
    first = 0
    label = "under page-cache churn: " if churn else ""
    for index in range(1, runs + 1):
        bystander, runaway = Session(cluster), Session(cluster)
        bystander.run("select 1;")
        oom_before = memcg.oom_kills()
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            churner = churning(memcg, tmp) if churn else None
            guards, loop = start_guard(memcg, pm, quiet_s)
            try:
                runaway.run(BIG_QUERY, 120)
            finally:
                loop.stop()
                guards.close()
                if churner is not None:
                    stop(churner)
        kills = memcg.oom_kills() - oom_before
        acted = [a for a in loop.actions if a["outcome"] == "relieved"]
        if acted and kills == 0:
            first += 1
        for action in loop.actions:
            event_us.append(action["event_to_signal_us"])
            if action["relief_ms"] is not None:
                relief_ms.append(action["relief_ms"])
        outcome = ", ".join(f"{a['signal']} {a['outcome']}" for a in loop.actions) or "none"
        print(f"{label}run {index}/{runs}: guard {outcome}; OOM kills {kills}", flush=True)
        bystander.close()
        runaway.close()
        cluster.wait_ready(60)
    if event_us:
        print(
            f"{label}pressure event -> signal sent: p50 {percentile(event_us, 0.5) / 1000:.2f} ms, "
            f"p99 {percentile(event_us, 0.99) / 1000:.2f} ms, max {max(event_us) / 1000:.2f} ms "
            f"over {len(event_us)} signals"
        )
    if relief_ms:
        print(
            f"{label}signal -> working set below the relief level: p50 "
            f"{statistics.median(relief_ms):.1f} ms, p99 {percentile(relief_ms, 0.99):.1f} ms, "
            f"max {max(relief_ms):.1f} ms"
        )
    print(f"{label}guard acted before the kernel's OOM killer: {first}/{runs} runs")
    if event_us and windows_ms:
        share = percentile(event_us, 0.99) / 1000 / min(windows_ms)
        print(
            f"{label}event -> signal p99 as a share of the shortest unguarded window: "
            f"{100 * share:.1f} %"
        )


def false_positives(
    cluster: HarnessCluster, memcg: MemoryCgroup, hold_s: float, quiet_s: float
) -> None:
    pm = cluster.postmaster_pid()
    reader = MemoryReader(MemoryGroup(memcg.version, memcg.path, memcg.path))
    holder, worker = Session(cluster), Session(cluster)
    # Grow one session in 1 MiB steps until the working set is at ~85 % of the limit.
    target = memcg.limit_bytes * 0.85
    step = 0
    while reader.sample().working_set_bytes < target:
        step += 1
        holder.run(f"select set_config('bench.hold{step}', repeat('x', 1048576), false);")
    held = reader.sample()
    oom_before = memcg.oom_kills()  # earlier sections' kills are theirs
    guards, loop = start_guard(memcg, pm, quiet_s)
    started_s = time.monotonic()
    cpu_before_s = loop.cpu_s()
    deadline = started_s + hold_s
    fills = 0
    highest = 0
    try:
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            while time.monotonic() < deadline:
                worker.run("select count(*) from generate_series(1, 200000);")
                subprocess.run(
                    [
                        "dd",
                        "if=/dev/zero",
                        f"of={tmp}/fill",
                        "bs=1M",
                        f"count={memcg.limit_bytes // MIB}",
                        "status=none",
                    ],
                    preexec_fn=lambda: enter(memcg.procs_file),
                    check=True,
                )
                subprocess.run(
                    ["cat", f"{tmp}/fill"],
                    stdout=subprocess.DEVNULL,
                    preexec_fn=lambda: enter(memcg.procs_file),
                    check=True,
                )
                fills += 1
                highest = max(highest, reader.sample().usage_bytes)
    finally:
        cpu_s = loop.cpu_s() - cpu_before_s
        elapsed_s = time.monotonic() - started_s
        loop.stop()
        guard = next(iter(guards.entries.values())).guard
        guards.close()
    events = guard.counters.pressure_events
    print(
        f"held working set {held.working_set_bytes / MIB:.0f} of {memcg.limit_bytes / MIB:.0f} "
        f"MiB ({100 * held.working_set_bytes / memcg.limit_bytes:.0f} %) for {elapsed_s:.1f} s, "
        f"{fills} page-cache fills to the limit (highest usage {highest / MIB:.0f} MiB): "
        f"{sum(events.values())} pressure events "
        f"({', '.join(f'{k} {v}' for k, v in sorted(events.items()))}), "
        f"{len(loop.actions)} actions, OOM kills {memcg.oom_kills() - oom_before}"
    )
    print(
        f"churn cost (vmpressure quiet {quiet_s * 1000:g} ms): {loop.wakeups / elapsed_s:.1f} "
        f"wakeups/s, guard CPU {cpu_s:.2f} s in {elapsed_s:.1f} s "
        f"({100 * cpu_s / elapsed_s:.1f} % of a CPU)"
    )
    holder.close()
    worker.close()


def idle(cluster: HarnessCluster, memcg: MemoryCgroup, idle_s: float, quiet_s: float) -> None:
    pm = cluster.postmaster_pid()
    guards, loop = start_guard(memcg, pm, quiet_s)
    time.sleep(idle_s)  # the measurement itself: nothing happens for this long
    loop.stop()
    guards.close()
    print(f"idle {idle_s:g} s with the guard on: {loop.wakeups} wakeups")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--baseline-runs", type=int, default=3, help="unguarded runs")
    parser.add_argument("--churn-runs", type=int, default=10)
    parser.add_argument("--vmpressure-quiet-ms", type=float, default=VMPRESSURE_QUIET_S * 1000)
    parser.add_argument("--hold-s", type=float, default=120.0)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--limit-mb", type=int, default=300)
    args = parser.parse_args()
    quiet_s = args.vmpressure_quiet_ms / 1000
    template = Template()
    memcg = MemoryCgroup(args.limit_mb * MIB, prefix="pgoom-bench-guard")
    cluster = HarnessCluster(template, memcg.procs_file)
    print(
        f"cgroup v{memcg.version} {memcg.path}, limit {args.limit_mb} MiB, "
        f"{os.cpu_count()} CPUs, Linux {os.uname().release}",
        flush=True,
    )
    try:
        cluster.start()
        if args.idle_s:
            idle(cluster, memcg, args.idle_s, quiet_s)
        windows_ms = (
            headroom(cluster, memcg, args.baseline_runs, quiet_s) if args.baseline_runs else []
        )
        if args.runs:
            latency(cluster, memcg, args.runs, quiet_s, windows_ms=windows_ms)
        if args.churn_runs:
            latency(cluster, memcg, args.churn_runs, quiet_s, churn=True)
        if args.hold_s:
            false_positives(cluster, memcg, args.hold_s, quiet_s)
    finally:
        cluster.destroy()
        template.cleanup()
        memcg.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
