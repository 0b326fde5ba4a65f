"""Run the OOM harness: `python -m scripts.oomharness --mode short|full --out results/`.

Exit codes: 0 every protected run kept its postmaster and every committed row; 1 a check
failed (the summary line and the report say which); 2 bad options or a host that cannot
run it (not root, no memory cgroup, no PostgreSQL).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Optional

from scripts.oomharness import report
from scripts.oomharness.cgroup import CgroupError, MemoryCgroup
from scripts.oomharness.pgcluster import become_subreaper
from scripts.oomharness.scenarios import (
    GUARDED,
    PROTECTED,
    SCENARIOS,
    UNPROTECTED,
    Config,
    Group,
    Harness,
    StormCycle,
)
from tests.support.pg import Template

MODES = {
    # runs per protected group, baseline runs, restart-storm cycles
    "short": (2, 1, 6),
    "full": (20, 3, 50),
}
# Runs with `pgoom watch --guard` per scenario: 2 in the short mode CI runs (the goal of each
# scenario, docs/guard.md, checked on every change), 20 in the full mode.
GUARDED_RUNS = {"short": 2, "full": 20}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.oomharness",
        description="Real memory-cgroup OOM kills against PostgreSQL, without and with pgoom.",
    )
    parser.add_argument("--mode", choices=sorted(MODES), default="short")
    parser.add_argument("--out", default="results", help="directory for the table, chart, JSON")
    parser.add_argument("--runs", type=int, help="protected runs per scenario (mode default)")
    parser.add_argument("--baseline-runs", type=int, help="unprotected runs per scenario")
    parser.add_argument(
        "--guarded-runs",
        type=int,
        help="runs per scenario with `pgoom watch --guard` (short: 2, full: 20)",
    )
    parser.add_argument("--storm-cycles", type=int, help="restart storm cycles (0: none)")
    parser.add_argument(
        "--scenario", action="append", choices=SCENARIOS, help="only these (repeatable)"
    )
    parser.add_argument("--limit-mb", type=int, default=Config.limit_mb, help="cgroup limit")
    parser.add_argument(
        "--hold-mb",
        type=int,
        default=Config.hold_mb,
        help="MiB each idle backend holds (0: calibrate below the postmaster)",
    )
    parser.add_argument(
        "--score", type=int, default=Config.score, help="pgoom watch --score (the postmaster)"
    )
    parser.add_argument(
        "--children-score",
        type=int,
        default=Config.children_score,
        help="PG_OOM_ADJUST_VALUE: every child of the postmaster",
    )
    parser.add_argument(
        "--launcher-score",
        type=int,
        default=Config.launcher_score,
        help="score of the process that starts PostgreSQL (and of the hog)",
    )
    parser.add_argument(
        "--oom-group",
        type=int,
        choices=(0, 1),
        default=0,
        help="memory.oom.group of the cgroup (v2 only; 1 = what kubelet sets)",
    )
    parser.add_argument(
        "--recovery-limit-s", type=float, default=Config.recovery_limit_s, help="protected runs"
    )
    parser.add_argument(
        "--group-kill",
        choices=("auto", "ungroup", "keep"),
        default=Config.group_kill,
        help="pgoom watch --group-kill (what pgoom does where memory.oom.group=1)",
    )
    args = parser.parse_args(argv)
    runs, baseline, storm = MODES[args.mode]
    args.runs = runs if args.runs is None else args.runs
    args.baseline_runs = baseline if args.baseline_runs is None else args.baseline_runs
    args.storm_cycles = storm if args.storm_cycles is None else args.storm_cycles
    if args.guarded_runs is None:
        args.guarded_runs = GUARDED_RUNS[args.mode]
    for name in ("runs", "baseline_runs", "guarded_runs", "storm_cycles", "limit_mb", "hold_mb"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 or more")
    for name in ("score", "children_score", "launcher_score"):
        if not -1000 <= getattr(args, name) <= 1000:
            parser.error(f"--{name.replace('_', '-')} must be from -1000 to 1000")
    return args


_MAIN_PID = os.getpid()
_stopping = False


def _on_signal(signum: int, _frame: object) -> None:
    """SIGTERM/SIGINT: unwind through every finally (watchers stopped, clusters and data
    dirs removed, the cgroup emptied and removed), once."""
    global _stopping
    if os.getpid() != _MAIN_PID:
        # A child between fork and exec (a preexec_fn) that inherited the pending signal:
        # it must not go on running the harness.
        os._exit(128 + signum)
    if _stopping:
        return  # the cleanup is under way: let it finish
    _stopping = True
    raise SystemExit(128 + signum)


def pg_version(template: Template) -> str:
    done = subprocess.run(
        [f"{template.bindir}/postgres", "--version"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip()


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("oom-harness: run as root (it creates cgroups and runs PostgreSQL as uid 26)")
        return 2
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    become_subreaper()
    os.makedirs(args.out, exist_ok=True)
    config = Config(
        limit_mb=args.limit_mb,
        hold_mb=args.hold_mb,
        score=args.score,
        children_score=args.children_score,
        launcher_score=args.launcher_score,
        recovery_limit_s=args.recovery_limit_s,
        group_kill=args.group_kill,
    )
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {message}", flush=True)

    try:
        cgroup = MemoryCgroup(config.limit_mb << 20, oom_group=args.oom_group)
    except (CgroupError, OSError) as err:
        print(f"oom-harness: {err}")
        return 2
    template: Optional[Template] = None
    harness: Optional[Harness] = None
    groups: list[Group] = []
    storm: Optional[tuple[Group, list[StormCycle]]] = None
    meta: dict[str, object] = {}
    try:
        template = Template()
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "mode": args.mode,
            "kernel": platform.release(),
            "postgres": pg_version(template),
            "cgroup": f"v{cgroup.version} {cgroup.path}",
            "oom_group": cgroup.oom_group,
            "cpus": os.cpu_count(),
        }
        log(
            f"cgroup v{cgroup.version} {cgroup.path} limit {config.limit_mb} MiB; "
            f"{meta['postgres']}; scores: pgoom {config.score}, children "
            f"{config.children_score}, launcher {config.launcher_score}"
        )
        harness = Harness(template, cgroup, config, log)
        if not harness.kernel.available:
            log("warning: /dev/kmsg unreadable: victims from the oom_kill counter only")
        for scenario in args.scenario or SCENARIOS:
            if args.baseline_runs:
                groups.append(harness.run_group(scenario, UNPROTECTED, args.baseline_runs))
            if args.runs:
                groups.append(harness.run_group(scenario, PROTECTED, args.runs))
            if args.guarded_runs:
                groups.append(harness.run_group(scenario, GUARDED, args.guarded_runs))
        if args.storm_cycles:
            storm = harness.storm(args.storm_cycles)
    finally:
        if harness is not None:
            harness.close()
        if template is not None:
            template.cleanup()
        problem = cgroup.remove()
        if problem:
            print(f"oom-harness: warning: {problem}")
    elapsed_s = time.monotonic() - started
    meta["elapsed_s"] = round(elapsed_s, 1)
    return write_outputs(args, config, groups, storm, meta)


def write_outputs(
    args: argparse.Namespace,
    config: Config,
    groups: list[Group],
    storm: Optional[tuple[Group, list[StormCycle]]],
    meta: dict[str, object],
) -> int:
    header = (
        f"OOM harness, {args.mode} mode, {meta.get('date')}: {meta.get('postgres')}, "
        f"Linux {meta.get('kernel')}, {meta.get('cpus')} CPUs, memory cgroup "
        f"{str(meta.get('cgroup', '?')).split()[0]} limit {config.limit_mb} MiB; "
        f"scores: postmaster {config.score} via `pgoom watch` (protected) or "
        f"{config.launcher_score} (unprotected), "
        f"children {config.children_score}; guarded: `pgoom watch --guard` as well; "
        f"{meta.get('elapsed_s')} s."
    )
    table = report.markdown(groups, storm, header)
    text = table + report.details(groups, storm)
    table_path = os.path.join(args.out, f"oom-harness-{args.mode}.md")
    with open(table_path, "w") as f:
        f.write(text)
    with open(os.path.join(args.out, f"oom-harness-{args.mode}.json"), "w") as f:
        f.write(report.to_json(groups, storm, config, meta))
    logs_dir = os.path.join(args.out, f"oom-harness-{args.mode}-logs")
    os.makedirs(logs_dir, exist_ok=True)
    for group in groups + ([storm[0]] if storm else []):
        stem = os.path.join(logs_dir, f"{group.scenario}-{group.mode}")
        for suffix, text in (
            ("pgoom.log", group.watcher_log),
            ("postgres.log", group.postgres_log_tail),
        ):
            if text:
                with open(f"{stem}.{suffix}", "w") as f:
                    f.write(text)
    chart_path = os.path.join(args.out, f"oom-harness-{args.mode}.png")
    chart_note = report.chart(groups, storm, chart_path)
    print()
    print(table)
    failures, warnings = report.verdict(groups, storm, config)
    for warning in warnings:
        print(f"warning: {warning}")
    for failure in failures:
        print(f"FAIL: {failure}")
    protected = [r for g in groups if g.mode == PROTECTED for r in g.runs]
    survived = sum(1 for r in protected if r.postmaster_survived)
    # Cumulative within a group (one table): its last run's figure is the group's.
    lost = sum(g.runs[-1].rows_lost or 0 for g in groups if g.runs)
    worst = max((r.recovery_s or 0.0 for r in protected), default=0.0)
    storm_text = ""
    if storm is not None:
        cycles = storm[1]
        worst_us = max((c.watcher_latency_us or 0 for c in cycles), default=0)
        storm_text = (
            f", restart storm {sum(c.protected for c in cycles)}/{len(cycles)} protected "
            f"(worst {worst_us} µs)"
        )
    baseline = [r for g in groups if g.mode == UNPROTECTED for r in g.runs]
    killed = sum(1 for r in baseline if not r.postmaster_survived)
    guarded = [r for g in groups if g.mode == GUARDED for r in g.runs]
    guard_text = ""
    if guarded:
        restarts = sum(1 for r in guarded if r.crash_restarts)
        guard_text = (
            f"; guarded runs: crash restart in {restarts}/{len(guarded)}, "
            f"at most {max((r.sessions_lost or 0) for r in guarded)} session(s) lost per run"
        )
    print(
        f"oom-harness: {'FAIL' if failures else 'PASS'} ({args.mode}): protected runs "
        f"{survived}/{len(protected)} postmaster survived, rows lost {lost}, worst recovery "
        f"{worst:.2f} s{storm_text}; baseline postmaster killed in {killed}/{len(baseline)} "
        f"runs{guard_text}; report {table_path}"
        + (f"; {chart_note}" if chart_note else f", {chart_path}")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
