"""What the guest's checks share: the installed pgoom, PostgreSQL clusters as uid 26 (the
Percona image's postgres user), systemctl, and the OOM harness as a subprocess."""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from typing import Any, Optional

from scripts.vm.guest.registry import Context, Failed
from tests.support.pg import Cluster, Template, read_score, wait_for

# Installed from this checkout's wheel by guest/run.sh, where the unit's ExecStart expects it.
PGOOM_VENV = "/opt/pgoom"
PGOOM = [f"{PGOOM_VENV}/bin/pgoom"]

_template: Optional[Template] = None


def template() -> Template:
    """One initdb for the whole suite (seconds under emulation), removed at exit."""
    global _template
    if _template is None:
        _template = Template()
        atexit.register(_template.cleanup)
    return _template


def production_cluster() -> Cluster:
    """A cluster started as a production runtime would: launcher at 0, children reset to 0
    by PostgreSQL itself (PG_OOM_ADJUST_FILE/VALUE)."""
    return Cluster(template(), launcher_score=0, children_score=0)


def run(
    argv: list[str], timeout_s: float = 60, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        argv, capture_output=True, text=True, timeout=timeout_s, check=False, **kwargs
    )


def pgoom(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return run([*PGOOM, *args], timeout_s)


def score_reaches(pid: int, target: int, timeout_s: float = 15) -> int:
    """Wait until pid's oom_score_adj is `target`; returns it (or fails with what it is)."""
    try:
        wait_for(lambda: read_score(pid) == target, timeout_s, 0.005, what=f"{pid} at {target}")
    except TimeoutError as err:
        raise Failed(f"pid {pid} at {read_score(pid)}, not {target}: {err}") from None
    return target


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


# --- systemd -------------------------------------------------------------------------------

UNIT = "pgoom.service"
DEBIAN_CLUSTER = "postgresql@15-main.service"
DEBIAN_DATA_DIR = "/var/lib/postgresql/15/main"


def systemctl(*args: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    return run(["systemctl", *args], timeout_s)


def show(unit: str, *props: str) -> dict[str, str]:
    done = systemctl("show", unit, "--property=" + ",".join(props))
    values: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        values[key] = value
    return values


def install_unit(src: str) -> None:
    """deploy/systemd as docs/bare-host.md installs it (idempotent)."""
    shutil.copy(f"{src}/deploy/systemd/pgoom.service", f"/etc/systemd/system/{UNIT}")
    dropin = "/etc/systemd/system/postgresql@.service.d"
    os.makedirs(dropin, exist_ok=True)
    shutil.copy(f"{src}/deploy/systemd/postgresql@.service.d/pgoom.conf", f"{dropin}/pgoom.conf")
    done = systemctl("daemon-reload")
    if done.returncode != 0:
        raise Failed(f"systemctl daemon-reload: {done.stderr.strip()}")


def journal(unit: str, lines: int = 30) -> str:
    return run(["journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "cat"]).stdout


def save_journal(ctx: Context, name: str, unit: str) -> None:
    with open(ctx.log_path(name, f"{unit}.journal"), "w") as f:
        f.write(journal(unit, 200))


# --- the OOM harness -----------------------------------------------------------------------


def harness_run(
    ctx: Context,
    name: str,
    scenario: str,
    oom_group: int,
    score: int,
    group_kill: str = "auto",
    runs: int = 1,
    guarded_runs: int = 0,
) -> dict[str, object]:
    """Protected runs of one scenario (`pgoom watch --score SCORE --group-kill POLICY`,
    children 0, launcher 0) in a cgroup with memory.oom.group=OOM_GROUP, then
    `guarded_runs` with `--guard` as well (the harness's guarded mode; runs=0 for those
    only). Returns the first group's first run and, over all its runs, how many the
    postmaster survived, kills, crash restarts and sessions lost; with guarded runs also
    the guard's figures (guard_figures). The verdict is the caller's (with keep,
    oom.group=1 and -900 the postmaster is expected to die)."""
    out = ctx.log_path(name, "harness")
    argv = [
        sys.executable, "-m", "scripts.oomharness", "--mode", "short", "--out", out,
        "--scenario", scenario, "--runs", str(runs), "--baseline-runs", "0",
        "--storm-cycles", "0", "--score", str(score), "--children-score", "0",
        "--launcher-score", "0", "--oom-group", str(oom_group), "--group-kill", group_kill,
        "--guarded-runs", str(guarded_runs),
        # Emulation (TCG) is 10-30x slower than the hardware the 2 s default was set on.
        "--recovery-limit-s", "30",
    ]  # fmt: skip
    done = run(argv, timeout_s=600 * (runs + guarded_runs), cwd=ctx.src)
    with open(f"{out}.log", "w") as f:
        f.write(done.stdout + done.stderr)
    try:
        with open(f"{out}/oom-harness-short.json") as f:
            doc = json.load(f)
        groups = doc["groups"]
        all_runs = groups[0]["runs"]
        first = all_runs[0]
    except (OSError, ValueError, KeyError, IndexError) as err:
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-4:])
        raise Failed(f"no harness result ({err}); exit {done.returncode}: {tail}") from None
    victims: dict[str, int] = {}  # role -> kills (a group kill names the chosen one twice)
    for victim in first["victims"]:
        victims[str(victim["role"])] = victims.get(str(victim["role"]), 0) + 1
    # The kernel's task list at the OOM, by role: a child at -1000 beside the postmaster
    # would be unkillable (auto must never leave one there).
    at_minus_1000 = sum(
        int(counts.get("-1000", 0))
        for r in all_runs
        for role, counts in r["scores"].items()
        if role != "postmaster"
    )
    guarded = [g for g in groups if g["mode"] == "guarded"]
    victims_all: dict[str, int] = {}  # role -> kills over every run of the group
    for r in all_runs:
        for victim in r["victims"]:
            victims_all[str(victim["role"])] = victims_all.get(str(victim["role"]), 0) + 1
    return {
        "runs": len(all_runs),
        "postmaster_survived_runs": sum(1 for r in all_runs if r["postmaster_survived"]),
        "oom_kills_all": sum(r["oom_kills"] for r in all_runs),
        "crash_restarts_all": sum(r["crash_restarts"] or 0 for r in all_runs),
        "crash_restart_runs": sum(1 for r in all_runs if r["crash_restarts"]),
        # None: the harness could not tell (a run that timed out before its sessions check).
        "sessions_lost_max": max(
            (r["sessions_lost"] for r in all_runs), default=None, key=_or_minus
        ),
        "sessions_all_lost_runs": sum(
            1 for r in all_runs if r["sessions_open"] and r["sessions_lost"] == r["sessions_open"]
        ),
        "sessions_open": first["sessions_open"],
        **(guard_figures(guarded[0]) if guarded else {}),
        "children_at_minus_1000": at_minus_1000,
        "oom_group_after": first.get("oom_group_after"),
        "rows_lost_all": sum(r["rows_expected"] - (r["rows_counted"] or 0) for r in all_runs),
        "harness_exit": done.returncode,
        "cgroup": doc["meta"].get("cgroup"),
        "oom_kills": first["oom_kills"],
        "victims": victims,
        "victims_all": victims_all,
        "postmaster_survived": first["postmaster_survived"],
        "postmaster_adj_at_oom": first["postmaster_adj_at_oom"],
        "recovery_s": first["recovery_s"],
        "rows_lost": first["rows_expected"] - (first["rows_counted"] or 0)
        if first["rows_counted"] is not None
        else None,
        "scores": first["scores"],
        "problems": [p for r in all_runs for p in r["problems"]] + groups[0]["problems"],
        "kernel": first["kernel_lines"][-2:],
    }


def _or_minus(value: Optional[int]) -> int:
    return -1 if value is None else value


# pgoom's line per guard action (watcher/guard/episode.py), as `pgoom watch --log-file`
# writes it: the signal, the event -> signal latency and the outcome ("relieved in 4.1 ms",
# "no relief within 1 s", ...).
_GUARD_ACTION = re.compile(
    # Greedy up to the line's last event_to_signal_us: the title before it is the backend's
    # ps title, which its user controls and may carry a forged field.
    r"guard: sent (SIG[A-Z]+) to client backend [^\n]*event_to_signal_us=(\d+): ([^\n]*)$",
    re.M,
)
_RELIEVED = re.compile(r"relieved in ([\d.]+) ms")


def _spread(values: list[float]) -> dict[str, object]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": round(statistics.median(ordered), 2),
        "max": round(ordered[-1], 2),
    }


def guard_figures(group: dict[str, Any]) -> dict[str, object]:
    """The guard's figures over one guarded group of the harness: its actions by signal and
    outcome, the runs in which it acted and the kernel killed nothing, and its latencies
    from pgoom's own log lines (event -> signal, signal -> relief)."""
    actions: dict[str, int] = {}
    event_ms: list[float] = []
    relief_ms: list[float] = []
    for match in _GUARD_ACTION.finditer(group.get("watcher_log") or ""):
        signal, event_us, outcome = match.groups()
        relief = _RELIEVED.fullmatch(outcome)
        key = f"{signal} {'relieved' if relief else outcome}"
        actions[key] = actions.get(key, 0) + 1
        event_ms.append(int(event_us) / 1000)
        if relief:
            relief_ms.append(float(relief.group(1)))
    runs = group["runs"]
    return {
        "guarded_runs": len(runs),
        "guard_actions": actions,
        "guard_acted_runs": sum(1 for r in runs if r["guard_actions"]),
        "guard_first_runs": sum(1 for r in runs if r["guard_first"]),
        "guard_oom_kills": sum(r["oom_kills"] for r in runs),
        "guard_crash_restarts": sum(r["crash_restarts"] or 0 for r in runs),
        "guard_sessions_lost_max": max(
            (r["sessions_lost"] for r in runs), default=None, key=_or_minus
        ),
        "guard_rows_lost": sum(r["rows_expected"] - (r["rows_counted"] or 0) for r in runs),
        "guard_postmaster_survived_runs": sum(1 for r in runs if r["postmaster_survived"]),
        "event_to_signal_ms": _spread(event_ms),
        "signal_to_relief_ms": _spread(relief_ms),
        "guard_problems": [p for r in runs for p in r["problems"]] + group["problems"],
    }
