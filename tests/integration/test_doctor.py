"""`pgoom doctor` on this machine: root in the initial namespaces, CAP_SYS_RESOURCE missing
from the bounding set (floor 0), cgroup v1 memory controller."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.support.pg import children_of, read_score
from tests.support.watcher import PGOOM
from watcher.commands.doctor import run_checks
from watcher.commands.doctor.checks import FAIL, PASS, WARN

pytestmark = pytest.mark.root


def doctor(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, *PGOOM, "doctor", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def by_name(report: dict[str, object]) -> dict[str, dict[str, str]]:
    checks = report["checks"]
    assert isinstance(checks, list)
    return {c["name"]: c for c in checks}


def test_default_score_fails_on_the_missing_capability() -> None:
    done = doctor()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    line = next(x for x in done.stdout.splitlines() if "cap_sys_resource" in x)
    assert line.startswith("FAIL") and "-900" in line
    fix_line = done.stdout.splitlines()[done.stdout.splitlines().index(line) + 1]
    assert "fix:" in fix_line and "SYS_RESOURCE" in fix_line
    assert done.stdout.rstrip().endswith("exit 1")


def test_json_and_reachable_score() -> None:
    done = doctor("--json", "--score", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["exit_code"] == 0 and report["status"] == WARN
    checks = by_name(report)
    assert checks["cap_sys_resource"]["status"] == WARN
    assert "SYS_RESOURCE" in checks["cap_sys_resource"]["fix"]
    assert (
        checks["oom_score_adj"]["status"] == PASS and "floor 0" in checks["oom_score_adj"]["detail"]
    )
    assert checks["kernel"]["status"] == PASS
    assert checks["netlink"]["status"] == PASS
    assert checks["namespaces"]["status"] == PASS
    assert checks["memory.oom.group"]["status"] == PASS
    # The postmasters' cgroups, not the doctor's own: none runs here, or each is on v1.
    detail = checks["memory.oom.group"]["detail"]
    assert "no postmaster running" in detail or "no group kill (cgroup v1)" in detail
    assert all(c["status"] in (PASS, WARN, FAIL) for c in checks.values())


def test_inside_a_pid_namespace_netlink_is_refused() -> None:
    done = doctor("--json", "--score", "0", prefix=("unshare", "--pid", "--fork", "--mount-proc"))
    checks = by_name(json.loads(done.stdout))
    assert checks["netlink"]["status"] == WARN and "ack" in checks["netlink"]["detail"]
    assert checks["namespaces"]["status"] == WARN and "pid" in checks["namespaces"]["detail"]
    assert done.returncode == 0


def test_unprivileged_user_sees_dac_override_warning() -> None:
    done = doctor(
        "--json",
        "--score",
        "0",
        prefix=("setpriv", "--reuid", "26", "--regid", "26", "--clear-groups"),
    )
    assert done.returncode == 0, done.stderr
    checks = by_name(json.loads(done.stdout))
    assert checks["cap_dac_override"]["status"] == WARN
    assert "uid 26" in checks["cap_dac_override"]["detail"]


def test_floor_probe_leaves_no_trace() -> None:
    """The probe writes to a child of its own, never to the caller, and reaps it."""
    before = read_score(os.getpid())
    results = {r.name: r for r in run_checks(0)}
    assert read_score(os.getpid()) == before
    assert "floor 0" in results["oom_score_adj"].detail
    assert children_of(os.getpid()) == []


def test_score_out_of_range_is_one_line_and_exit_2() -> None:
    done = doctor("--score", "5000")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "pgoom: --score 5000 is out of range: use a value from -1000 to 1000"
    ]
