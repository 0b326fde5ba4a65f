"""The guard's checks on cgroup v2 (issue 12): `pgoom watch --guard` against real OOMs in the
guest, where the guard watches a PSI trigger on the postmaster's memory.pressure and the
pollable memory.events (watcher/guard/pressure.py) instead of cgroup v1's eventfds.

Every OOM case goes through the harness's guarded mode (support.harness_run with
guarded_runs); the baselines are the harness's protected mode (pgoom watch, no guard). Runs
per guarded check in full mode: PGOOM_VM_GUARD_RUNS (default 20), per baseline:
PGOOM_VM_GUARD_BASELINE_RUNS (default 3); short mode (CI) runs one guarded big query.
"""

from __future__ import annotations

import os
import re
import sys

from scripts.oomharness.scenarios import BIG_QUERY, HOG, MANY_BACKENDS
from scripts.vm.guest.registry import Context, Failed, Figures, check, expect
from scripts.vm.guest.support import harness_run, run

# Production scores where the kernel takes them (the VM has CAP_SYS_RESOURCE): pgoom at
# -900, children reset to 0 by PG_OOM_ADJUST_VALUE.
SCORE = -900


def _runs(ctx: Context, variable: str, default: int) -> int:
    """Runs per check: 1 in short mode (CI's budget), else the variable (vm-test.sh passes it
    through the work disk and has checked it is a positive integer)."""
    if ctx.mode != "full":
        return 1
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise Failed(f"{variable}={text!r}: a positive number of runs")
    return int(text)


def guarded_runs(ctx: Context) -> int:
    return _runs(ctx, "PGOOM_VM_GUARD_RUNS", 20)


def baseline_runs(ctx: Context) -> int:
    return _runs(ctx, "PGOOM_VM_GUARD_BASELINE_RUNS", 3)


def _guard_stops_it(
    ctx: Context, name: str, scenario: str, oom_group: int = 0, group_kill: str = "auto"
) -> Figures:
    """The guard's goal for a runaway backend: it is cancelled (or terminated) before the
    kernel kills anything, in every run: 0 OOM kills, 0 crash restarts, at most the one
    offending session lost, no committed row lost, the postmaster alive."""
    runs = guarded_runs(ctx)
    figures = harness_run(
        ctx, name, scenario, oom_group, SCORE, group_kill=group_kill, runs=0, guarded_runs=runs
    )
    expect(
        figures.get("guarded_runs") == runs,
        f"{figures.get('guarded_runs')} of {runs} guarded runs done",
        **figures,
    )
    expect(
        figures["guard_acted_runs"] == runs,
        f"the guard acted in {figures['guard_acted_runs']} of {runs} runs",
        **figures,
    )
    expect(
        figures["guard_oom_kills"] == 0,
        f"the kernel killed {figures['guard_oom_kills']} process(es)",
        **figures,
    )
    expect(
        figures["guard_crash_restarts"] == 0,
        f"{figures['guard_crash_restarts']} crash restart(s)",
        **figures,
    )
    lost = figures["guard_sessions_lost_max"]
    expect(
        lost is not None and int(str(lost)) <= 1,
        f"{lost} sessions lost in one run (at most 1)",
        **figures,
    )
    expect(figures["guard_rows_lost"] == 0, "committed rows lost", **figures)
    expect(figures["guard_postmaster_survived_runs"] == runs, "the postmaster died", **figures)
    expect(
        not any(k.startswith("SIGKILL") for k in figures["guard_actions"]),  # type: ignore[attr-defined]
        "the guard sent SIGKILL",
        **figures,
    )
    expect(not figures["guard_problems"], "the harness reported problems", **figures)
    return figures


@check(
    "guard cgroup v2: big-query guarded: the guard cancels it, 0 OOM kills, 0 crash restarts, "
    "at most 1 session lost, rows lost 0"
)
def guard_big_query(ctx: Context) -> Figures:
    return _guard_stops_it(ctx, "guard-big-query", BIG_QUERY)


@check(
    "guard cgroup v2: many-backends guarded: one backend stopped, 0 OOM kills, "
    "0 crash restarts, at most 1 session lost, rows lost 0",
    modes=("full",),
)
def guard_many_backends(ctx: Context) -> Figures:
    return _guard_stops_it(ctx, "guard-many-backends", MANY_BACKENDS)


@check(
    "guard cgroup v2: big-query guarded, oom.group=1 + group-kill auto: the guard cancels it "
    "before the group kill",
    modes=("full",),
)
def guard_big_query_group_kill(ctx: Context) -> Figures:
    # Production Kubernetes: kubelet's memory.oom.group=1 and pgoom's default policy (-1000
    # for the postmaster). A kernel OOM here would kill every auxiliary process as well.
    return _guard_stops_it(ctx, "guard-big-query-g1", BIG_QUERY, oom_group=1, group_kill="auto")


@check(
    "guard cgroup v2: non-postgres-hog guarded: the guard does nothing, the kernel kills the "
    "hog, the postmaster survives",
    modes=("full",),
)
def guard_hog(ctx: Context) -> Figures:
    runs = guarded_runs(ctx)
    figures = harness_run(ctx, "guard-hog", HOG, 0, SCORE, runs=0, guarded_runs=runs)
    expect(
        figures.get("guarded_runs") == runs,
        f"{figures.get('guarded_runs')} of {runs} guarded runs done",
        **figures,
    )
    expect(
        not figures["guard_actions"],
        "the guard acted on a process that is not PostgreSQL",
        **figures,
    )
    expect(
        int(str(figures["guard_oom_kills"])) >= runs,
        "a run without an OOM kill (nothing was tested)",
        **figures,
    )
    expect(
        figures["victims_all"] == {"hog": figures["guard_oom_kills"]},
        "the kernel killed something other than the hog",
        **figures,
    )
    expect(figures["guard_postmaster_survived_runs"] == runs, "the postmaster died", **figures)
    expect(figures["guard_crash_restarts"] == 0, "a crash restart", **figures)
    expect(figures["guard_rows_lost"] == 0, "committed rows lost", **figures)
    return figures


def _unguarded(ctx: Context, name: str, scenario: str) -> Figures:
    """The comparison: pgoom protects the postmaster (-900) but no guard runs, so the kernel
    kills a backend and PostgreSQL resets every session (a crash restart) in every run."""
    runs = baseline_runs(ctx)
    figures = harness_run(ctx, name, scenario, 0, SCORE, runs=runs)
    expect(figures["runs"] == runs, f"{figures['runs']} of {runs} runs done", **figures)
    expect(int(str(figures["oom_kills_all"])) >= runs, "a run without an OOM kill", **figures)
    expect(figures["postmaster_survived_runs"] == runs, "the postmaster died", **figures)
    expect(
        figures["crash_restart_runs"] == runs,
        f"a crash restart in {figures['crash_restart_runs']} of {runs} runs",
        **figures,
    )
    expect(
        figures["sessions_all_lost_runs"] == runs,
        f"every session lost in {figures['sessions_all_lost_runs']} of {runs} runs",
        **figures,
    )
    expect(figures["rows_lost_all"] == 0, "committed rows lost", **figures)
    return figures


@check(
    "guard cgroup v2: big-query unguarded (baseline): a crash restart, every session lost",
    modes=("full",),
)
def unguarded_big_query(ctx: Context) -> Figures:
    return _unguarded(ctx, "guard-baseline-big-query", BIG_QUERY)


@check(
    "guard cgroup v2: many-backends unguarded (baseline): a crash restart, every session lost",
    modes=("full",),
)
def unguarded_many_backends(ctx: Context) -> Figures:
    return _unguarded(ctx, "guard-baseline-many-backends", MANY_BACKENDS)


# --- the benchmark (scripts/bench_guard.py) on cgroup v2 -------------------------------------

_BENCH_FIGURES = {
    "cgroup": re.compile(r"^(cgroup v\d \S+)", re.M),
    "event_to_signal": re.compile(r"^pressure event -> signal sent: (.*)$", re.M),
    "signal_to_relief": re.compile(r"^signal -> working set below the relief level: (.*)$", re.M),
    "acted_first": re.compile(
        r"^guard acted before the kernel's OOM killer: (\d+)/(\d+) runs", re.M
    ),
    "false_positives": re.compile(r"^held working set (.*)$", re.M),
    "fp_actions": re.compile(r"^held working set .*?: \d+ pressure events, (\d+) actions", re.M),
    "idle_wakeups": re.compile(r"^idle \S+ s with the guard on: (\d+) wakeups", re.M),
}


@check(
    "guard cgroup v2: benchmark: pressure event -> signal, signal -> relief, idle wakeups",
    modes=("full",),
)
def guard_benchmark(ctx: Context) -> Figures:
    """scripts/bench_guard.py on a v2 memcg, small: its printed figures become this check's
    (docs/benchmarks.md's cgroup v2 row). Asserts the issue's goals: the guard acted first
    in every run, no action while ~85 % is held under page-cache fills, 0 idle wakeups."""
    runs = guarded_runs(ctx)
    hold_s = os.environ.get("PGOOM_VM_GUARD_HOLD_S", "60")
    argv = [
        sys.executable,
        "scripts/bench_guard.py",
        "--runs",
        str(runs),
        "--hold-s",
        hold_s,
        "--idle-s",
        "20",
    ]
    done = run(argv, timeout_s=300 + 200 * runs + float(hold_s) * 3, cwd=ctx.src)
    text = done.stdout + done.stderr
    with open(ctx.log_path("guard-benchmark", "log"), "w") as f:
        f.write(text)
    figures: Figures = {"bench_exit": done.returncode, "runs": runs, "hold_s": float(hold_s)}
    for key, pattern in _BENCH_FIGURES.items():
        found = pattern.search(done.stdout)
        if found:
            figures[key] = found.group(1) if key != "acted_first" else found.group(0)
    acted = _BENCH_FIGURES["acted_first"].search(done.stdout)
    expect(done.returncode == 0, f"bench_guard exit {done.returncode}", **figures)
    expect(
        acted is not None and acted.group(1) == acted.group(2) == str(runs),
        "the guard did not act first in every run",
        **figures,
    )
    expect(figures.get("fp_actions") == "0", "the guard acted below the threshold", **figures)
    expect(figures.get("idle_wakeups") == "0", "the guard woke while memory was idle", **figures)
    return figures
