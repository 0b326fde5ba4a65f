"""Relative protection (watcher.relative): which PG_OOM_ADJUST_VALUE `pgoom exec` exports when
it cannot lower the postmaster, and the one line it says. The real OOM that proves the point
runs in scripts/docker-e2e.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from watcher.exec.entrypoint import Usage, parse_args
from watcher.relative import (
    DEFAULT_RELATIVE_SCORE,
    RelativeUsage,
    children_value,
    parse_relative_score,
    read_own_score,
)

REPO = Path(__file__).resolve().parents[2]


def test_protected_as_asked_keeps_the_documented_children_value() -> None:
    assert children_value(-900, -900, 0, 1000, "x") == (0, None)
    assert children_value(-997, -900, 0, 1000, "x") == (0, None)  # a Guaranteed pod's -997


def test_unknown_own_score_changes_nothing() -> None:
    assert children_value(None, -900, 0, 1000, "x") == (0, None)


def test_not_lowered_ranks_children_above_the_postmaster() -> None:
    value, line = children_value(0, -900, 0, 1000, "not root")
    assert value == 1000
    assert line is not None
    assert line.startswith("pgoom: relative protection:")
    assert "stays at oom_score_adj 0 (not root)" in line
    assert "\n" not in line


def test_a_kubelet_floor_below_1000_still_leaves_room() -> None:
    value, line = children_value(999, -900, 0, 1000, "lowering to -900 was refused")
    assert value == 1000 and line is not None and "relative protection" in line


def test_no_room_above_the_postmaster_is_said_and_nothing_is_raised() -> None:
    # BestEffort: 1000 is already the top.
    value, line = children_value(1000, -900, 0, 1000, "not root")
    assert value == 0
    assert line is not None and line.startswith("pgoom: warning:") and "BestEffort" in line
    # A configured value at or below the postmaster's: same.
    value, line = children_value(500, -900, 0, 400, "not root")
    assert value == 0 and line is not None and "--relative-score 400" in line


def test_off_keeps_the_children_value_and_warns() -> None:
    value, line = children_value(0, -900, 0, None, "not root")
    assert value == 0
    assert line is not None and "relative protection is off" in line


def test_a_children_score_already_above_wins() -> None:
    value, line = children_value(0, -900, 500, 1000, "not root")
    assert value == 500
    assert line is not None and "(--children-score)" in line


def test_never_below_or_equal_the_postmaster_when_on() -> None:
    """Whatever the scores, an exported value is either above the postmaster's or the line
    says that nothing could rank the children above it."""
    for own in range(-1000, 1001, 50):
        for relative in (-1000, -1, 0, 1, 500, 999, 1000):
            value, line = children_value(own, -1000 if own > -1000 else -1001, 0, relative, "w")
            if own <= -1000:
                continue
            assert value > own or (line is not None and "no score above it" in line), (
                own,
                relative,
            )


@pytest.mark.parametrize(
    ("text", "expected"), [("1000", 1000), ("-5", -5), ("off", None), ("OFF", None), ("no", None)]
)
def test_parse_relative_score(text: str, expected: int | None) -> None:
    assert parse_relative_score(text, "--relative-score") == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("1001", "out of range"), ("abc", "not a number"), ("x" * 500, "not a number")],
)
def test_parse_relative_score_rejects(text: str, message: str) -> None:
    with pytest.raises(RelativeUsage, match=message) as info:
        parse_relative_score(text, "--relative-score")
    assert len(str(info.value)) < 120  # hostile input is not echoed whole


def test_exec_options_and_environment() -> None:
    assert parse_args(["cmd"], {}).relative_score == DEFAULT_RELATIVE_SCORE == 1000
    assert parse_args(["cmd"], {"PGOOM_RELATIVE_SCORE": "off"}).relative_score is None
    env = {"PGOOM_RELATIVE_SCORE": "off"}
    assert parse_args(["--relative-score", "700", "cmd"], env).relative_score == 700
    with pytest.raises(Usage, match="PGOOM_RELATIVE_SCORE 2000 is out of range"):
        parse_args(["cmd"], {"PGOOM_RELATIVE_SCORE": "2000"})


def test_standard_library_only() -> None:
    """`pgoom exec` imports this on the database's start path."""
    probe = (
        "import sys, watcher.relative; "
        "print(sorted(m for m in ('psutil', 'typer', 'loguru', 'pyroute2') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert done.stdout.strip() == "[]"


def test_read_own_score(tmp_path: Path) -> None:
    assert read_own_score() == int(Path("/proc/self/oom_score_adj").read_text())
    (tmp_path / "adj").write_text("garbage\n")
    assert read_own_score(str(tmp_path / "adj")) is None
    assert read_own_score(str(tmp_path / "missing")) is None


def test_exec_exports_it_for_real() -> None:
    """The real `pgoom exec` as an unprivileged process at a score it cannot go below: the
    command sees PG_OOM_ADJUST_VALUE above its own score, and its own score is unchanged."""
    if os.geteuid() == 0:
        runner = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    else:
        runner = []
    probe = (
        "import os; print(os.environ['PG_OOM_ADJUST_VALUE'],"
        " open('/proc/self/oom_score_adj').read().strip())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG_OOM", "PGOOM"))}
    env["PYTHONPATH"] = str(REPO)
    usable = subprocess.run(
        [*runner, sys.executable, "-c", "import watcher"],
        capture_output=True, text=True, env=env, timeout=60, check=False, cwd="/",
    )  # fmt: skip
    if usable.returncode != 0:
        # e.g. a pyenv build under /root whose libpython uid 65534 cannot load
        pytest.skip(f"{sys.executable} cannot run as uid 65534: {usable.stderr.strip()[:200]}")
    done = subprocess.run(
        [
            "choom", "-n", "300", "--", *runner, sys.executable, "-m", "watcher", "exec",
            "--", "/usr/bin/python3", "-c", probe,
        ],
        capture_output=True, text=True, env=env, timeout=60, check=False, cwd="/",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1000", "300"]
    assert "pgoom: relative protection: the postmaster stays at oom_score_adj 300" in done.stderr
