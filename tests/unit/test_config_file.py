"""The TOML rules file: every problem is one line naming file and line; options and PGOOM_*
variables win over the file; rules come whole from one place."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
from typer.main import get_command

from watcher.cli import app, watch_args
from watcher.config_file import Resolved, parse_config, resolve
from watcher.errors import UsageError
from watcher.limits import DEFAULT_PATTERN, DEFAULT_SCORE, EXIT_USAGE


def run_resolve(args: list[str], config: Optional[str] = None) -> Resolved:
    """Parse `pgoom watch ARGS` exactly as the CLI does (env included), then resolve."""
    command = get_command(app).commands["watch"]  # type: ignore[attr-defined]
    full = [*args, "--config", config] if config is not None else [*args, "--config", ""]
    ctx = command.make_context("watch", full)
    return resolve(watch_args(ctx))


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pgoom.toml"
    path.write_text(text)
    return str(path)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PGOOM_"):
            monkeypatch.delenv(name)


# --- errors: one line, file:line: problem ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("score = \n", 1, "invalid value"),
        ("source = 'poll'\nsource = 'netlink'\n", 2, "cannot overwrite a value"),
        ("# c\n\nscor = 1\n", 3, "unknown key 'scor'"),
        ("score = -2000\n", 1, "score = -2000 is out of range"),
        ("score = true\n", 1, "score must be an integer, not True"),
        ("all = 1\n", 1, "all must be true or false, not 1"),
        ("interval = 0\n", 1, "interval = 0 must be greater than 0"),
        ("interval = '5'\n", 1, "interval must be an integer or a number"),
        ("metrics_address = 'localhost'\n", 1, "metrics_address = 'localhost' must be HOST:PORT"),
        ("[watch]\nscore = 0\n", 1, "unknown table [watch]"),
        ("score = 0\n\n[[rule]]\nscore = 0\n", 3, "needs exactly one of pattern"),
        (
            "[[rule]]\npattern = 'a'\n[[rule]]\npattern = 'b'\ndata_dir = '/x'\n",
            3,
            "this one has pattern, data_dir",
        ),
        (
            "[[rule]]\npattern = 'a'\n\n[[rule]]\n  pattern = 'post(gres'\n",
            5,
            "not a valid regular",
        ),
        ("[[rule]]\ndata_dir = 'pgdata'\n", 2, "must be an absolute path"),
        ("[[rule]]\ndata_dir = '/etc/hostname'\n", 2, "exists but is not a directory"),
        ("[[rule]]\nall = true\nchildren_score = 1001\n", 3, "children_score = 1001 is out"),
        ("[[rule]]\nall = true\nmatch = 'x'\n", 3, "unknown key 'match' in [[rule]]"),
        ("rule = 1\n", 1, "'rule' must be an array of tables"),
        ("\nsource = 'kqueue'\n", 2, "source = 'kqueue' is unknown"),
        ("log_level = 'loud'\n", 1, "log_level = 'loud' is unknown"),
    ],
)
def test_a_bad_file_is_one_line_naming_file_and_line(text: str, line: int, problem: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_config(text, "/etc/pgoom.toml")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"/etc/pgoom.toml:{line}: "), message
    assert problem in message


def test_the_command_exits_2_with_that_line(tmp_path: Path) -> None:
    path = write(tmp_path, "score = 0\n[[rule]]\npattern = 'x'\nscore = 'low'\n")
    done = subprocess.run(
        [sys.executable, "-m", "watcher", "watch", "--config", path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == EXIT_USAGE
    assert done.stderr == f"pgoom: {path}:4: score must be an integer, not 'low'\n"


def test_an_explicit_config_must_exist(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--config .*/missing.toml: no such file"):
        run_resolve([], config=str(tmp_path / "missing.toml"))


def test_the_default_path_may_be_absent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("watcher.config_file.DEFAULT_CONFIG_PATH", str(tmp_path / "none.toml"))
    command = get_command(app).commands["watch"]  # type: ignore[attr-defined]
    ctx = command.make_context("watch", [])
    resolved = resolve(watch_args(ctx))
    assert [r.pattern.pattern for r in resolved.settings.rules if r.pattern] == [DEFAULT_PATTERN]
    assert resolved.notes == ()


# --- precedence -------------------------------------------------------------------------------

FILE = """
source = "poll"
score = -500
interval = 5
all = true
log_level = "debug"
metrics_address = "127.0.0.1:9187"

[[rule]]
pattern = 'postgres -D /srv/pg'
score = -1000
children_score = 0

[[rule]]
data_dir = "/var/lib/postgresql/15/main"
"""


def test_the_file_sets_options_and_rules(tmp_path: Path) -> None:
    resolved = run_resolve([], write(tmp_path, FILE))
    settings = resolved.settings
    assert settings.source == "poll"
    assert settings.interval_s == 5.0
    assert settings.log_level == "DEBUG"
    assert resolved.metrics_address == "127.0.0.1:9187"
    first, second, catch_all = settings.rules
    assert first.pattern is not None and first.pattern.pattern == "postgres -D /srv/pg"
    assert (first.score, first.children_score) == (-1000, 0)
    assert (second.data_dir, second.score, second.children_score) == (
        "/var/lib/postgresql/15/main",
        -500,  # the file's top-level score is the default for its rules
        None,
    )
    assert (catch_all.pattern, catch_all.data_dir, catch_all.score) == (None, None, -500)
    assert settings.data_dirs == ["/var/lib/postgresql/15/main"]  # inotify watches it
    assert "2 rule(s)" in resolved.notes[0]


def test_options_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, FILE)
    settings = run_resolve(
        ["--source", "netlink", "--score", "0", "--interval", "1"], path
    ).settings
    assert (settings.source, settings.interval_s) == ("netlink", 1.0)
    # An explicit --score applies to every rule, the file's own scores included.
    assert {r.score for r in settings.rules} == {0}
    # What was not given still comes from the file.
    assert settings.log_level == "DEBUG"
    assert settings.rules[0].children_score == 0


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, FILE)
    monkeypatch.setenv("PGOOM_SCORE", "-100")
    monkeypatch.setenv("PGOOM_ALL", "false")
    monkeypatch.setenv("PGOOM_METRICS_ADDRESS", "[::1]:9999")
    resolved = run_resolve([], path)
    assert {r.score for r in resolved.settings.rules} == {-100}
    assert len(resolved.settings.rules) == 2  # PGOOM_ALL=false removed the catch-all
    assert resolved.metrics_address == "[::1]:9999"


def test_the_command_line_beats_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGOOM_SCORE", "-100")
    settings = run_resolve(["--score", "7"], write(tmp_path, FILE)).settings
    assert {r.score for r in settings.rules} == {7}


def test_patterns_given_replace_the_files_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, FILE)
    resolved = run_resolve(["--pattern", "postgres -D /pgdata/a"], path)
    patterns = [r.pattern.pattern for r in resolved.settings.rules if r.pattern]
    assert patterns == ["postgres -D /pgdata/a"]
    assert any("are not used" in note for note in resolved.notes)
    monkeypatch.setenv("PGOOM_DATA_DIR", "/pgdata/b:/pgdata/c")
    settings = run_resolve([], path).settings
    assert [r.data_dir for r in settings.rules if r.data_dir] == ["/pgdata/b", "/pgdata/c"]


def test_an_empty_file_keeps_the_defaults(tmp_path: Path) -> None:
    settings = run_resolve([], write(tmp_path, "# nothing yet\n")).settings
    assert len(settings.rules) == 1
    rule = settings.rules[0]
    assert rule.pattern is not None and rule.pattern.pattern == DEFAULT_PATTERN
    assert rule.score == DEFAULT_SCORE


def test_log_file_empty_string_means_no_file(tmp_path: Path) -> None:
    assert run_resolve([], write(tmp_path, 'log_file = ""\n')).settings.log_file is None


def test_an_all_rule_with_its_own_score(tmp_path: Path) -> None:
    settings = run_resolve([], write(tmp_path, "[[rule]]\nall = true\nscore = -1000\n")).settings
    assert [(r.pattern, r.data_dir, r.score) for r in settings.rules] == [(None, None, -1000)]


def test_the_example_in_the_docs_parses() -> None:
    """docs/configuration.md's example file is real TOML that pgoom accepts."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    blocks = re.findall(r"```toml\n(.*?)```", doc.read_text(), flags=re.S)
    assert blocks, "docs/configuration.md has no ```toml example"
    for block in blocks:
        parse_config(block, "docs/configuration.md")


def test_fallback_key_and_its_override(tmp_path: Path) -> None:
    path = write(tmp_path, "fallback = false\n")
    assert run_resolve([], path).settings.fallback is False
    assert run_resolve(["--fallback"], path).settings.fallback is True


@pytest.mark.skipif(os.geteuid() != 0, reason="the ownership rule applies to root only")
def test_root_refuses_a_file_others_can_write(tmp_path: Path) -> None:
    path = write(tmp_path, "score = 0\n")
    os.chmod(path, 0o666)
    with pytest.raises(UsageError, match=r"mode 0666: it must belong to root"):
        run_resolve([], path)
    os.chmod(path, 0o644)
    os.chown(path, 26, 26)
    with pytest.raises(UsageError, match=r"owned by uid 26"):
        run_resolve([], path)


def test_an_unknown_log_level_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"--log-level 'loud' is unknown"):
        run_resolve(["--log-level", "loud"])
