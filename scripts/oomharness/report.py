"""The harness's outputs: a Markdown table, a PNG chart, the raw results as JSON, and the
verdict (what failed, if anything)."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import asdict
from typing import Optional

from scripts.oomharness.scenarios import (
    BIG_QUERY,
    GUARDED,
    HOG,
    MANY_BACKENDS,
    PROTECTED,
    UNPROTECTED,
    WATCHED,
    Config,
    Group,
    RunResult,
    StormCycle,
)


def _seconds(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f} s"
    return f"median {statistics.median(values):.2f} s, max {max(values):.2f} s"


def _victims(group: Group) -> str:
    counts: Counter[str] = Counter()
    for run in group.runs:
        for victim in run.victims:
            counts[f"{victim.role} ({victim.name}, adj {victim.oom_score_adj})"] += 1
    # In order of first kill: unprotected, the postmaster goes first and its orphans after.
    return ", ".join(f"{name} x{n}" for name, n in counts.items()) or "none"


def _recovery(group: Group) -> str:
    times = [r.recovery_s for r in group.runs if r.recovery_s is not None]
    died = [r for r in group.runs if not r.postmaster_survived]
    text = _seconds(times) if times else ""
    if died:
        refused = next((r.refused for r in died if r.refused), "")
        dead = f"{len(died)}x never: connections refused until restarted by hand"
        if refused:
            dead += f" (`{refused[:70]}`)"
        text = f"{text}; {dead}" if text else dead
    return text or "-"


def _rows_lost(group: Group) -> str:
    # One table per group and each run counts all of it: a run's figure already includes
    # the earlier runs' losses, so the group's is the last run's, not their sum.
    lost = [r.rows_lost for r in group.runs]
    if not lost:
        return "-"
    if any(x is None for x in lost):
        return "not counted"
    return str(lost[-1])


def _sessions_lost(group: Group) -> str:
    counted = [r for r in group.runs if r.sessions_lost is not None]
    if not counted:
        return "-"
    lost = [r.sessions_lost or 0 for r in counted]
    opened = [r.sessions_open for r in counted]
    if len(counted) == 1:
        return f"{lost[0]}/{opened[0]}"
    return f"max {max(lost)} of {max(opened)} (total {sum(lost)}/{sum(opened)})"


def _crash_restarts(group: Group) -> str:
    counted = [r.crash_restarts for r in group.runs if r.crash_restarts is not None]
    if not counted:
        return "-"
    restarted = sum(1 for n in counted if n)
    return f"{sum(counted)} (in {restarted}/{len(counted)} runs)"


def _guard(group: Group) -> str:
    if group.mode != GUARDED or not group.runs:
        return "-"
    first = sum(1 for r in group.runs if r.guard_first)
    signals = Counter(a.split(" ", 1)[0] for r in group.runs for a in r.guard_actions)
    sent = ", ".join(f"{sig} x{n}" for sig, n in sorted(signals.items())) or "no action"
    return f"acted first {first}/{len(group.runs)}; {sent}"


def markdown(
    groups: list[Group], storm: Optional[tuple[Group, list[StormCycle]]], header: str
) -> str:
    lines = [
        header,
        "",
        "| scenario | mode | runs | postmaster survived | victims | rows lost | recovery time "
        "| sessions lost | crash restarts | guard |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for group in groups:
        survived = sum(1 for r in group.runs if r.postmaster_survived)
        lines.append(
            f"| {group.scenario} | {group.mode} | {len(group.runs)} | "
            f"{survived}/{len(group.runs)} | {_victims(group)} | {_rows_lost(group)} | "
            f"{_recovery(group)} | {_sessions_lost(group)} | {_crash_restarts(group)} | "
            f"{_guard(group)} |"
        )
    if storm is not None:
        group, cycles = storm
        protected = sum(1 for c in cycles if c.protected)
        worst_us = max((c.watcher_latency_us or 0 for c in cycles), default=0)
        worst_seen = max((c.seen_to_protected_ms or 0.0 for c in cycles), default=0.0)
        lines.append(
            f"| restart storm | {PROTECTED} | {len(cycles)} cycles | "
            f"{protected}/{len(cycles)} new postmasters protected | - | - | worst protection "
            f"latency {worst_us} µs (pgoom: exec → written); {worst_seen:.1f} ms seen unprotected "
            "| - | - | - |"
        )
    return "\n".join(lines) + "\n"


def details(groups: list[Group], storm: Optional[tuple[Group, list[StormCycle]]]) -> str:
    """Per-group evidence: scores and sizes at the OOM, the kernel's own lines."""
    out = ["", "### Evidence", ""]
    for group in groups:
        if not group.runs:
            continue
        first = group.runs[0]
        scores = "; ".join(
            f"{role}: " + ", ".join(f"{adj} x {n}" for adj, n in counts.items())
            for role, counts in sorted(first.scores.items())
        )
        sizes = ", ".join(f"{role} {mb} MiB" for role, mb in sorted(first.rss_mb.items()))
        out.append(f"**{group.scenario} / {group.mode}** (run 1 of {len(group.runs)})")
        out.append("")
        out.append(f"- oom_score_adj (role: score x processes), from {first.view}: {scores}")
        out.append(f"- largest RSS per role, same source: {sizes}")
        if first.hold_mb:
            out.append(
                f"- sessions opened before the OOM: {first.sessions_before_oom} holding "
                f"{first.hold_mb} MiB each, cgroup usage then {first.usage_mb_before} MiB"
            )
        if first.postmaster_adj_at_oom is not None:
            out.append(
                f"- postmaster's oom_score_adj in the kernel's task dump: "
                f"{first.postmaster_adj_at_oom}"
            )
        out.append(f"- oom_kill counter increase: {first.oom_kills}")
        if group.start_protect_ms:
            out.append(
                "- cluster start → postmaster at target score: "
                + ", ".join(f"{ms:.1f} ms" for ms in group.start_protect_ms)
            )
        if group.verify_codes:
            out.append(f"- `pgoom verify` exit codes: {group.verify_codes}")
        for line in first.kernel_lines:
            out.append(f"- kernel: `{line.strip()[:220]}`")
        notes = sorted({n for r in group.runs for n in r.notes})
        for note in notes:
            out.append(f"- note: {note}")
        problems = group.problems + [p for r in group.runs for p in r.problems]
        for problem in problems:
            out.append(f"- PROBLEM: {problem}")
        out.append("")
    if storm is not None:
        group, cycles = storm
        kinds = Counter(c.kind for c in cycles)
        lat = sorted(c.watcher_latency_us for c in cycles if c.watcher_latency_us is not None)
        out.append(f"**restart storm** ({', '.join(f'{k} x{n}' for k, n in kinds.items())})")
        out.append("")
        if lat:
            out.append(
                f"- pgoom exec → written: median {statistics.median(lat)} µs, "
                f"max {lat[-1]} µs over {len(lat)} cycles"
            )
        starts = [c.start_to_protected_ms for c in cycles if c.start_to_protected_ms is not None]
        if starts:
            out.append(
                f"- launch → at target (kill -9 path): median {statistics.median(starts):.1f} ms,"
                f" max {max(starts):.1f} ms"
            )
        for problem in group.problems:
            out.append(f"- PROBLEM: {problem}")
        out.append("")
    return "\n".join(out)


def verdict(
    groups: list[Group], storm: Optional[tuple[Group, list[StormCycle]]], config: Config
) -> tuple[list[str], list[str]]:
    """(failures, warnings). Failures make the harness exit non-zero."""
    failures: list[str] = []
    warnings: list[str] = []
    for group in groups:
        name = f"{group.scenario}/{group.mode}"
        failures += [f"{name}: {p}" for p in group.problems]
        for run in group.runs:
            tag = f"{name} #{run.index}"
            if group.mode == GUARDED:
                failures += _guarded_failures(tag, run)
            elif run.oom_kills == 0:
                failures.append(f"{tag}: no OOM kill happened (nothing was tested)")
            if run.rows_lost is None:
                failures.append(f"{tag}: committed rows not counted")
            elif run.rows_lost != 0:
                failures.append(f"{tag}: {run.rows_lost} committed rows lost")
            if group.mode in WATCHED:
                if not run.postmaster_survived:
                    failures.append(f"{tag}: the postmaster was killed")
                elif run.oom_kills and (
                    run.recovery_s is None or run.recovery_s > config.recovery_limit_s
                ):
                    failures.append(
                        f"{tag}: connections not accepted within {config.recovery_limit_s} s "
                        f"(took {run.recovery_s})"
                    )
                failures += [f"{tag}: {p}" for p in run.problems]
            else:
                warnings += [f"{tag}: {p}" for p in run.problems]
                if run.baseline_resets:
                    warnings.append(
                        f"{tag}: another process lowered the unprotected postmaster's score "
                        f"{run.baseline_resets}x (another pgoom on this host?); put back"
                    )
        if group.mode in WATCHED and any(code != 0 for code in group.verify_codes):
            failures.append(f"{name}: pgoom verify exit codes {group.verify_codes}")
        if (
            group.mode == UNPROTECTED
            and group.scenario == MANY_BACKENDS
            and group.runs
            and all(r.postmaster_survived for r in group.runs)
        ):
            warnings.append(
                f"{name}: the baseline did not reproduce (the kernel never chose the "
                "postmaster): the protected runs prove less on this host"
            )
    if storm is not None:
        group, cycles = storm
        failures += [f"restart-storm: {p}" for p in group.problems]
        failures += [
            f"restart-storm #{c.index} ({c.kind}): postmaster {c.pid} not protected"
            for c in cycles
            if not c.protected
        ]
    return failures, warnings


def _guarded_failures(tag: str, run: RunResult) -> list[str]:
    """The guard's goal: a runaway backend is stopped before the kernel kills anything (0
    crash restarts, at most its own session lost); a hog that is not PostgreSQL is left to
    the kernel."""
    failures = []
    if run.scenario in (BIG_QUERY, MANY_BACKENDS):
        if run.crash_restarts:
            failures.append(f"{tag}: {run.crash_restarts} crash restart(s) with the guard on")
        if run.oom_kills:
            failures.append(f"{tag}: the kernel killed {run.oom_kills} process(es) first")
        if not run.guard_actions:
            failures.append(f"{tag}: the guard did nothing")
        if run.sessions_lost is None or run.sessions_lost > 1:
            failures.append(f"{tag}: {run.sessions_lost} sessions lost (at most 1 allowed)")
    elif run.scenario == HOG:
        if run.guard_actions:
            failures.append(f"{tag}: the guard acted on a hog that is not PostgreSQL")
        if run.oom_kills == 0:
            failures.append(f"{tag}: no OOM kill happened (nothing was tested)")
    return failures


def to_json(
    groups: list[Group],
    storm: Optional[tuple[Group, list[StormCycle]]],
    config: Config,
    meta: dict[str, object],
) -> str:
    doc = {
        "meta": meta,
        "config": asdict(config),
        "groups": [asdict(g) for g in groups],
        "storm": None
        if storm is None
        else {"group": asdict(storm[0]), "cycles": [asdict(c) for c in storm[1]]},
    }
    return json.dumps(doc, indent=2, default=str)


def chart(
    groups: list[Group], storm: Optional[tuple[Group, list[StormCycle]]], path: str
) -> Optional[str]:
    """Recovery times of the protected runs, and protection latencies; None if matplotlib
    is missing (the table and JSON are the results, the chart is a picture of them)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart"
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names: list[str] = []
    for position, group in enumerate(g for g in groups if g.mode == PROTECTED):
        times = [r.recovery_s * 1000 for r in group.runs if r.recovery_s is not None]
        names.append(group.scenario)
        left.scatter([position] * len(times), times, alpha=0.6, s=18)
        if times:
            left.hlines(statistics.median(times), position - 0.25, position + 0.25, colors="k")
    left.set_xticks(range(len(names)))
    left.set_xticklabels(names)
    left.set_ylabel("ms")
    left.set_title("Protected runs: OOM kill → connection accepted")
    left.set_ylim(bottom=0)
    if storm is not None:
        _, cycles = storm
        xs = [c.index for c in cycles if c.watcher_latency_us is not None]
        ys = [c.watcher_latency_us / 1000 for c in cycles if c.watcher_latency_us is not None]
        right.plot(xs, ys, "o-", ms=3, label="pgoom: exec → oom_score_adj written")
        starts = [(c.index, c.start_to_protected_ms) for c in cycles if c.start_to_protected_ms]
        if starts:
            right.plot(
                [s[0] for s in starts],
                [s[1] for s in starts],
                "s",
                ms=3,
                label="harness: launch → at target (kill -9 path)",
            )
    scenario_starts = [ms for g in groups for ms in g.start_protect_ms]
    if scenario_starts:
        right.axhline(
            max(scenario_starts),
            color="gray",
            ls="--",
            lw=1,
            label="worst cluster start → at target",
        )
    right.set_xlabel("restart storm cycle")
    right.set_ylabel("ms")
    right.set_title("Protection latency of each new postmaster")
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
