"""The registry of in-guest checks. Adding one: a function here, decorated with
`@check("what it checks")` (`modes=("full",)` if short mode can do without it), that does
the real thing and returns its figures, or raises Failed. docs/vm-test.md lists them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from scripts.oomharness.scenarios import BIG_QUERY, MANY_BACKENDS
from scripts.vm.guest.registry import Context, Failed, Figures, check, expect
from scripts.vm.guest.support import (
    DEBIAN_CLUSTER,
    DEBIAN_DATA_DIR,
    PGOOM,
    UNIT,
    environ_of,
    harness_run,
    install_unit,
    journal,
    pgoom,
    production_cluster,
    run,
    save_journal,
    score_reaches,
    show,
    systemctl,
)
from tests.support.pg import children_settled_at, read_score, wait_for
from tests.support.watcher import Watcher

_LATENCY = re.compile(r"protected postmaster pid=(\d+) .*?latency_us=(\d+|-)")

# --- 1. scores below zero (CAP_SYS_RESOURCE) -------------------------------------------------


def _watch_protects(ctx: Context, name: str, score: int, args: list[str]) -> Figures:
    """`pgoom watch ARGS` protects a postmaster started as uid 26; its log and `pgoom verify`
    (with the same score) agree; the children stay at 0 (PG_OOM_ADJUST_VALUE)."""
    cluster = production_cluster()
    watcher = Watcher(*args)
    try:
        watcher.wait_ready(60)
        pm = cluster.start()
        score_reaches(pm, score)
        log = watcher.wait_for_log(f"protected postmaster pid={pm} ", 30)
        verify = pgoom("verify", *args, "--timeout", "10")
        children = children_settled_at(pm, 0, minimum=3, timeout_s=30)
        latency = next((m[1] for m in _LATENCY.findall(log) if int(m[0]) == pm), None)
        figures: Figures = {
            "postmaster_score": read_score(pm),
            "children_at_0": len(children),
            "verify_exit": verify.returncode,
            "watch_latency_us": latency,
        }
        expect(verify.returncode == 0, f"pgoom verify exited {verify.returncode}: "
               f"{verify.stdout.strip()} {verify.stderr.strip()}", **figures)  # fmt: skip
        return figures
    finally:
        with open(ctx.log_path(name, "pgoom.log"), "w") as f:
            f.write(watcher.text())
        watcher.stop()
        cluster.destroy()


@check("scores: watch writes the default -900, its log and verify agree")
def watch_default(ctx: Context) -> Figures:
    return _watch_protects(ctx, "watch-default", -900, [])


@check("scores: watch --score -1000, its log and verify agree")
def watch_minus_1000(ctx: Context) -> Figures:
    return _watch_protects(ctx, "watch-1000", -1000, ["--score", "-1000"])


@check("scores: exec as root lowers itself to -900, the postmaster inherits it, children 0")
def exec_inherits(ctx: Context) -> Figures:
    cluster = production_cluster()
    # --no-watch: the score must come from exec itself (inherited), not from a monitor.
    postgres = [f"{cluster.bindir}/postgres", "-D", cluster.data_dir, "-k", cluster.socket_dir]
    argv = [*PGOOM, "exec", "--user", "26", "--no-watch", "--", *postgres]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C"}
    log = open(cluster.log_path, "ab")
    proc = subprocess.Popen(
        argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, start_new_session=True
    )
    log.close()
    cluster.proc = proc
    try:
        wait_for(cluster.is_ready, 60, 0.1, what="the postmaster pgoom exec started")
        pm = cluster.postmaster_pid()
        expect(pm == proc.pid, f"postmaster {pm} is not the exec'd process {proc.pid}")
        env = environ_of(pm)
        children = children_settled_at(pm, 0, minimum=3, timeout_s=30)
        figures: Figures = {
            "postmaster_score": read_score(pm),
            "postmaster_uid": os.stat(f"/proc/{pm}").st_uid,
            "PG_OOM_ADJUST_FILE": env.get("PG_OOM_ADJUST_FILE"),
            "PG_OOM_ADJUST_VALUE": env.get("PG_OOM_ADJUST_VALUE"),
            "children_at_0": len(children),
        }
        expect(figures["postmaster_score"] == -900, "postmaster not at -900", **figures)
        expect(figures["postmaster_uid"] == 26, "postmaster not running as uid 26", **figures)
        expect(env.get("PG_OOM_ADJUST_VALUE") == "0", "PG_OOM_ADJUST_VALUE not 0", **figures)
        return figures
    finally:
        cluster.destroy()


@check("scores: doctor shows no floor (CAP_SYS_RESOURCE, -900 reachable)")
def doctor_no_floor(ctx: Context) -> Figures:
    done = pgoom("doctor", "--json")
    try:
        report = json.loads(done.stdout)
    except ValueError:
        raise Failed(f"doctor --json: not JSON: {done.stdout[:200]} {done.stderr[:200]}") from None
    checks = {c["name"]: c for c in report["checks"]}
    with open(ctx.log_path("doctor", "json"), "w") as f:
        f.write(done.stdout)
    figures: Figures = {
        "doctor_exit": done.returncode,
        "counts": report.get("counts"),
        **{name: f"{checks[name]['status']}: {checks[name]['detail'][:160]}"
           for name in ("cap_sys_resource", "oom_score_adj", "memory.oom.group") if name in checks},
    }  # fmt: skip
    for name in ("cap_sys_resource", "oom_score_adj"):
        expect(checks.get(name, {}).get("status") == "pass", f"doctor: {name} not pass", **figures)
    return figures


# --- 2. systemd as PID 1: deploy/systemd as shipped ------------------------------------------


def _unit_up(ctx: Context) -> dict[str, str]:
    install_unit(ctx.src)
    done = systemctl("start", UNIT)
    state = show(UNIT, "ActiveState", "SubState", "MainPID", "Result", "NRestarts")
    if done.returncode != 0 or state["ActiveState"] != "active":
        save_journal(ctx, "unit-start", UNIT)
        raise Failed(f"systemctl start {UNIT}: {done.stderr.strip()}", **state,
                     journal=journal(UNIT, 8).splitlines())  # fmt: skip
    return state


@check("systemd unit: Type=notify is active only after the first scan")
def unit_notify(ctx: Context) -> Figures:
    """A postmaster already running when pgoom starts must be protected by the time
    `systemctl start` returns: that is READY=1 sent after the first /proc scan."""
    systemctl("stop", UNIT)
    cluster = production_cluster()
    try:
        pm = cluster.start()
        expect(read_score(pm) == 0, f"postmaster already at {read_score(pm)} before pgoom")
        started = time.monotonic()
        state = _unit_up(ctx)
        start_s = round(time.monotonic() - started, 2)
        score_at_ready = read_score(pm)
        props = show(UNIT, "Type", "NotifyAccess", "CapabilityBoundingSet")
        # Linux 6.1 without CAP_NET_ADMIN (not in the unit): the source pgoom fell back to.
        source = next((line for line in journal(UNIT, 40).splitlines()
                       if line.startswith("source:") or " source: " in line), "")  # fmt: skip
        figures: Figures = {"start_s": start_s, "score_when_active": score_at_ready,
                            "type": props["Type"], "main_pid": state["MainPID"],
                            "source": source[source.find("source:"):][:160]}  # fmt: skip
        expect(props["Type"] == "notify", "unit is not Type=notify", **figures)
        expect(score_at_ready == -900, "active before the running postmaster was protected",
               **figures)  # fmt: skip
        return figures
    finally:
        systemctl("stop", UNIT)
        cluster.destroy()


@check("systemd unit: Restart=on-failure brings it back after kill -9")
def unit_restart(ctx: Context) -> Figures:
    state = _unit_up(ctx)
    old = int(state["MainPID"])
    before = int(state.get("NRestarts") or 0)
    os.kill(old, signal.SIGKILL)
    killed = time.monotonic()

    def back() -> bool:
        now = show(UNIT, "ActiveState", "MainPID", "NRestarts")
        return now["ActiveState"] == "active" and now["MainPID"] not in ("0", str(old))

    try:
        wait_for(back, 60, 0.1, what=f"{UNIT} restarted")
    except TimeoutError as err:
        save_journal(ctx, "unit-restart", UNIT)
        raise Failed(str(err), **show(UNIT, "ActiveState", "SubState", "Result")) from None
    now = show(UNIT, "MainPID", "NRestarts")
    figures: Figures = {"old_pid": old, "new_pid": int(now["MainPID"]),
                        "restart_s": round(time.monotonic() - killed, 2),
                        "n_restarts": int(now["NRestarts"]) - before}  # fmt: skip
    systemctl("stop", UNIT)
    return figures


@check("systemd drop-in: pgoom starts before postgresql@15-main and protects it")
def unit_protects_debian_cluster(ctx: Context) -> Figures:
    """Debian's own cluster, started by systemd: the drop-in pulls pgoom in (Wants=) and
    orders it first (After=); the hardened unit can still write the postmaster's score."""
    install_unit(ctx.src)
    systemctl("stop", DEBIAN_CLUSTER, UNIT)
    done = systemctl("start", DEBIAN_CLUSTER, timeout_s=180)
    try:
        expect(done.returncode == 0, f"systemctl start {DEBIAN_CLUSTER}: {done.stderr.strip()}")
        pg = show(DEBIAN_CLUSTER, "MainPID", "ExecMainStartTimestampMonotonic", "After", "Wants")
        unit = show(UNIT, "ActiveState", "ActiveEnterTimestampMonotonic")
        pm = int(pg["MainPID"])
        figures: Figures = {
            "pgoom_active": unit["ActiveState"],
            "pgoom_ready_before_postgres_s": round(
                (int(pg["ExecMainStartTimestampMonotonic"])
                 - int(unit["ActiveEnterTimestampMonotonic"] or 0)) / 1e6, 3),
            "postmaster": pm,
        }  # fmt: skip
        expect(unit["ActiveState"] == "active", "pgoom not pulled in by the drop-in", **figures)
        expect(UNIT in pg["After"].split(), "postgresql@15-main not After=pgoom", **figures)
        expect(float(str(figures["pgoom_ready_before_postgres_s"])) >= 0,
               "postgres started before pgoom was ready", **figures)  # fmt: skip
        figures["postmaster_score"] = score_reaches(pm, -900)
        children = [int(c) for c in open(f"/proc/{pm}/task/{pm}/children").read().split()]
        figures["children_scores"] = sorted({read_score(c) for c in children})
        verify = pgoom("verify", "--data-dir", DEBIAN_DATA_DIR, "--pattern", "postgres",
                       "--timeout", "10")  # fmt: skip
        figures["verify_exit"] = verify.returncode
        expect(verify.returncode == 0, f"pgoom verify: {verify.stdout.strip()}", **figures)
        return figures
    finally:
        save_journal(ctx, "debian-cluster", UNIT)
        systemctl("stop", DEBIAN_CLUSTER)
        systemctl("stop", UNIT)


@check("systemd unit: systemctl stop ends it cleanly")
def unit_stop(ctx: Context) -> Figures:
    state = _unit_up(ctx)
    started = time.monotonic()
    done = systemctl("stop", UNIT)
    after = show(UNIT, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    figures: Figures = {"stop_s": round(time.monotonic() - started, 2), "pid": state["MainPID"],
                        **after, "last_log": journal(UNIT, 3).splitlines()}  # fmt: skip
    expect(done.returncode == 0, f"systemctl stop: {done.stderr.strip()}", **figures)
    expect(after["ActiveState"] == "inactive" and after["Result"] == "success",
           "not a clean stop", **figures)  # fmt: skip
    return figures


# --- 3. the OOM harness on cgroup v2 (production scores: children 0) -------------------------


def _protects(ctx: Context, name: str, scenario: str, oom_group: int, score: int) -> Figures:
    figures = harness_run(ctx, name, scenario, oom_group, score)
    expect(figures["oom_kills"], "no OOM kill happened (nothing was tested)", **figures)
    expect(figures["postmaster_survived"], "the postmaster was killed", **figures)
    expect("postmaster" not in str(figures["victims"]), "the postmaster was a victim", **figures)
    expect(figures["rows_lost"] == 0, "committed rows lost", **figures)
    expect(not figures["problems"], "the harness reported problems", **figures)
    return figures


def _group_kill(ctx: Context, name: str, scenario: str, score: int) -> Figures:
    """memory.oom.group=1 (what kubelet sets): the kernel kills every task not at -1000.
    `--group-kill keep`: pgoom's default (auto) would protect with -1000 (the group-kill
    checks in groupkill.py prove that); the baseline is what the configured score does."""
    figures = harness_run(ctx, name, scenario, 1, score, group_kill="keep")
    expect(figures["oom_kills"], "no OOM kill happened (nothing was tested)", **figures)
    expect(not figures["postmaster_survived"], "the postmaster survived a group kill", **figures)
    expect("postmaster" in str(figures["victims"]), "the kernel log names no postmaster", **figures)
    expect(not figures["problems"], "the harness reported problems", **figures)
    return figures


# Short mode (CI) keeps three OOM cases, all in groupkill.py: auto (the fix), ungroup (the
# kernel kills only the backend at oom.group=0, -900 kept) and keep (the -900 baseline dies).
# The harness's own cases below repeat those outcomes without pgoom's policy, at ~2.5 min
# each under TCG, so they run in full mode.
@check("harness cgroup v2: big-query, oom.group=0: -900 protects", modes=("full",))
def harness_big_query(ctx: Context) -> Figures:
    return _protects(ctx, "harness-big-query-g0", BIG_QUERY, 0, -900)


@check("harness cgroup v2: many-backends, oom.group=0: -900 protects", modes=("full",))
def harness_many_backends(ctx: Context) -> Figures:
    return _protects(ctx, "harness-many-backends-g0", MANY_BACKENDS, 0, -900)


@check("harness cgroup v2: big-query, oom.group=1: -900 dies (baseline)", modes=("full",))
def harness_big_query_group(ctx: Context) -> Figures:
    return _group_kill(ctx, "harness-big-query-g1", BIG_QUERY, -900)


# Full mode only: the group kill spares nothing above -1000 whoever triggered it, so
# big-query above is the short mode's proof; this costs another 2 min under TCG.
@check("harness cgroup v2: many-backends, oom.group=1: -900 dies (baseline)", modes=("full",))
def harness_many_backends_group(ctx: Context) -> Figures:
    return _group_kill(ctx, "harness-many-backends-g1", MANY_BACKENDS, -900)


@check("harness cgroup v2: big-query, oom.group=1: -1000 survives", modes=("full",))
def harness_big_query_group_1000(ctx: Context) -> Figures:
    return _protects(ctx, "harness-big-query-g1-1000", BIG_QUERY, 1, -1000)


@check("harness cgroup v2: many-backends, oom.group=1: -1000 survives", modes=("full",))
def harness_many_backends_group_1000(ctx: Context) -> Figures:
    return _protects(ctx, "harness-many-backends-g1-1000", MANY_BACKENDS, 1, -1000)


# --- 4. the tests the host suite skips (pytest -m vm) ----------------------------------------


@check("pytest -m vm: tests that need CAP_SYS_RESOURCE or cgroup v2")
def pytest_vm(ctx: Context) -> Figures:
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "vm",
            "-rs", "tests"]  # fmt: skip
    done = run(argv, timeout_s=900, cwd=ctx.src)
    with open(ctx.log_path("pytest-vm", "log"), "w") as f:
        f.write(done.stdout + done.stderr)
    last = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", last)}
    figures: Figures = {"pytest_exit": done.returncode, **counts, "summary": last}
    expect(done.returncode == 0, "pytest -m vm failed", **figures)
    expect(counts.get("passed", 0) > 0 and not counts.get("skipped"),
           "no vm test ran, or one skipped here", **figures)  # fmt: skip
    return figures
