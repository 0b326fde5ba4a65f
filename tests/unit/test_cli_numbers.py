"""Every number pgoom takes is finite and in range, from the command line, the environment
and the TOML file alike: one `pgoom:` line and exit 2 (issue 9, item 9). On main, `--interval
nan` spun at 98 % CPU, `verify --timeout nan` never returned and `--rcvbuf 1e20` was a
traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_cli import assert_one_line, run

HUGE = "99999999999999999999"
# Should a watcher start after all (as on main), it writes nothing and stops on its own.
SAFE = {"PGOOM_DRY_RUN": "1", "PGOOM_LOG_FILE": ""}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["watch", "--interval", "nan"], "--interval"),
        (["watch", "--interval", "inf"], "--interval"),
        (["watch", "--interval", "-inf"], "--interval"),
        (["watch", "--verify-interval", "nan"], "--verify-interval"),
        (["watch", "--verify-interval", "inf"], "--verify-interval"),
        (["watch", "--rcvbuf", HUGE], "--rcvbuf"),
        (["watch", "--rcvbuf", "0"], "--rcvbuf"),
        (["watch", "--pattern", ""], "--pattern"),
        (["verify", "--timeout", "nan"], "--timeout"),
        (["verify", "--timeout", "inf"], "--timeout"),
        (["status", "--pattern", ""], "--pattern"),
        (["adjust", "-1", "--score", "0"], "-1"),
        (["adjust", "0", "--score", "0"], "0"),
        (["adjust", HUGE, "--score", "0"], HUGE),
    ],
)
def test_every_number_is_finite_and_in_range(args: list[str], needle: str) -> None:
    assert_one_line(run(*args, env=SAFE), 2, needle)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"PGOOM_INTERVAL": "nan"}, "--interval"),
        ({"PGOOM_VERIFY_INTERVAL": "inf"}, "--verify-interval"),
        ({"PGOOM_RCVBUF": HUGE}, "--rcvbuf"),
    ],
)
def test_numbers_from_the_environment_too(env: dict[str, str], needle: str) -> None:
    assert_one_line(run("watch", env={**env, **SAFE}), 2, needle)


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        (f"rcvbuf = {HUGE}\n", "rcvbuf"),
        ("interval = nan\n", "interval"),
        ("verify_interval = inf\n", "verify_interval"),
        ("[[rule]]\npattern = ''\n", "pattern"),
    ],
)
def test_numbers_from_the_config_file_too(tmp_path: Path, toml: str, needle: str) -> None:
    path = tmp_path / "pgoom.toml"
    path.write_text(toml)
    assert_one_line(run("watch", "--config", str(path), env=SAFE), 2, needle)


@pytest.mark.parametrize(
    ("args", "toml", "needle"),
    [
        (["--trusted-binary", "bin/postgres"], "", "--trusted-binary 'bin/postgres'"),
        ([], "trusted_binaries = ['bin/postgres']\n", "trusted_binaries"),
        ([], "trusted_binaries = '/opt/pg/bin/postgres'\n", "a list of strings"),
    ],
)
def test_trusted_binaries_are_absolute_paths(
    tmp_path: Path, args: list[str], toml: str, needle: str
) -> None:
    path = tmp_path / "pgoom.toml"
    path.write_text(toml)
    done = run("watch", "--config", str(path), *args, env=SAFE)
    assert_one_line(done, 2, needle)
