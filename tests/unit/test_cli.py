"""The real command line, as a subprocess: bad input is one `pgoom: ...` line on stderr and
exit 2 (never a traceback); every option has its PGOOM_* environment variable."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.watcher import PGOOM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PGOOM_")}
    full_env.update(env or {})
    return subprocess.run(
        [*PGOOM, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=full_env,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert done.returncode == code, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("pgoom: "), done.stderr
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["watch", "--score", "5000"], "--score 5000 is out of range"),
        (["watch", "--score", "-1001"], "--score -1001 is out of range"),
        (["watch", "--score", "0", "--children-score", "2000"], "--children-score 2000"),
        (["watch", "--pattern", "("], "is not a valid regular expression"),
        (["watch", "--data-dir", "pgdata/pg16"], "must be an absolute path"),
        (["watch", "--source", "bogus"], "--source 'bogus' is unknown"),
        (["watch", "--source", "inotify"], "--source inotify needs at least one --data-dir"),
        (["watch", "--interval", "0"], "--interval"),
        (["watch", "--verify-interval", "-1"], "--verify-interval"),
        (["adjust", "1", "--score", "-2000"], "--score -2000 is out of range"),
        (["status", "--score", "1001"], "--score 1001 is out of range"),
        (["status", "--pattern", "[a-"], "is not a valid regular expression"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], needle: str) -> None:
    # --log-file '' keeps a test from touching the default log in /tmp, should it start.
    extra = ["--log-file", ""] if args[0] == "watch" else []
    assert_one_line(run(*args, *extra), 2, needle)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"PGOOM_SCORE": "5000"}, "--score 5000 is out of range"),
        ({"PGOOM_SOURCE": "bogus"}, "--source 'bogus' is unknown"),
        ({"PGOOM_PATTERN": "("}, "is not a valid regular expression"),
        ({"PGOOM_DATA_DIR": "/ok:relative"}, "--data-dir 'relative'"),
        ({"PGOOM_INTERVAL": "0"}, "--interval"),
        ({"PGOOM_CHILDREN_SCORE": "-5000"}, "--children-score -5000"),
    ],
)
def test_env_vars_are_validated_like_options(env: dict[str, str], needle: str) -> None:
    assert_one_line(run("watch", env={**env, "PGOOM_LOG_FILE": ""}), 2, needle)


def test_adjust_no_such_pid_is_exit_3() -> None:
    with open("/proc/sys/kernel/pid_max") as f:
        beyond = int(f.read()) + 1
    assert_one_line(run("adjust", str(beyond), "--score", "0"), 3, f"no process with pid {beyond}")


# Click's own parse errors (not an integer, unknown option or command) still print typer's
# usage box over several lines; watcher/cli.py must turn them into one line too.
CLICK_ERRORS = [
    ["adjust", "abc"],
    ["watch", "--score", "abc"],
    ["watch", "--bogus"],
    ["nosuch"],
]


@pytest.mark.parametrize("args", CLICK_ERRORS)
def test_click_parse_errors_are_one_line(args: list[str]) -> None:
    assert_one_line(run(*args), 2)


def test_version_and_help() -> None:
    version = run("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("pgoom ")
    helped = run("watch", "--help")
    assert helped.returncode == 0
    for option in (
        "--source",
        "--score",
        "--pattern",
        "--data-dir",
        "--interval",
        "--children-score",
        "--log-file",
        "--log-json",
        "--dry-run",
    ):
        assert option in helped.stdout
