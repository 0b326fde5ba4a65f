"""Settings validation: every bad input is one UsageError (exit 2) saying what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from watcher.config import build_rules, check_data_dir, make_settings
from watcher.errors import UsageError
from watcher.limits import DEFAULT_PATTERN, DEFAULT_SCORE, EXIT_USAGE
from watcher.options import DEFAULT_INTERVAL_S, DEFAULT_LOG_FILE


def usage_error(**kwargs: object) -> str:
    with pytest.raises(UsageError) as info:
        make_settings(**kwargs)  # type: ignore[arg-type]
    assert info.value.exit_code == EXIT_USAGE == 2
    message = str(info.value)
    assert "\n" not in message  # one line
    return message


def test_defaults_are_those_of_the_script_pgoom_replaces() -> None:
    settings = make_settings()
    assert settings.source == "auto"
    assert settings.interval_s == DEFAULT_INTERVAL_S == 30.0
    assert settings.log_file == DEFAULT_LOG_FILE == "/tmp/postgres-oom-adjuster.log"
    assert [r.pattern.pattern for r in settings.rules if r.pattern] == [DEFAULT_PATTERN]
    assert settings.rules[0].score == DEFAULT_SCORE == -900
    assert settings.rules[0].children_score is None
    assert settings.fallback


@pytest.mark.parametrize("score", [-1001, 1001, 5000, -100000])
def test_score_out_of_range(score: int) -> None:
    assert usage_error(score=score) == (
        f"--score {score} is out of range: use a value from -1000 to 1000"
    )


def test_children_score_out_of_range() -> None:
    assert usage_error(score=0, children_score=1001).startswith("--children-score 1001")


@pytest.mark.parametrize("pattern", ["(", "[a-", "*postgres", "a{2,1}"])
def test_bad_regex(pattern: str) -> None:
    message = usage_error(patterns=[pattern])
    assert message.startswith(f"--pattern {pattern!r} is not a valid regular expression: ")


@pytest.mark.parametrize("path", ["pgdata/pg16", "./pg16", "", "~/pg"])
def test_relative_data_dir(path: str) -> None:
    assert usage_error(data_dirs=[path]) == (
        f"--data-dir {path!r} must be an absolute path, such as /pgdata/pg16"
    )


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    file = tmp_path / "f"
    file.write_text("")
    assert usage_error(data_dirs=[str(file)]) == f"--data-dir {file} exists but is not a directory"


def test_data_dir_that_does_not_exist_yet_is_fine(tmp_path: Path) -> None:
    # The inotify source waits for it to appear (a volume mounted later).
    assert check_data_dir(str(tmp_path / "later" / "pg16") + "/") == str(
        tmp_path / "later" / "pg16"
    )


@pytest.mark.parametrize("source", ["bogus", "netlinks", "inotfy", ""])
def test_unknown_source(source: str) -> None:
    assert usage_error(source=source) == (
        f"--source {source!r} is unknown: use one of auto, netlink, inotify, poll"
    )


def test_source_is_case_insensitive() -> None:
    assert make_settings(source="NetLink").source == "netlink"


def test_inotify_without_data_dir() -> None:
    assert usage_error(source="inotify") == (
        "--source inotify needs at least one --data-dir (e.g. /pgdata/pg16)"
    )
    assert make_settings(source="inotify", data_dirs=["/pgdata/pg16"]).data_dirs == ["/pgdata/pg16"]


@pytest.mark.parametrize("interval", [0, -1, -0.5])
def test_bad_intervals(interval: float) -> None:
    assert "--interval" in usage_error(interval_s=interval)
    assert "--verify-interval" in usage_error(verify_interval_s=interval)


@pytest.mark.parametrize("rcvbuf", [0, -5])
def test_bad_rcvbuf(rcvbuf: int) -> None:
    assert usage_error(rcvbuf_bytes=rcvbuf).startswith(f"--rcvbuf {rcvbuf}")


def test_rules_order_patterns_dirs_all() -> None:
    rules = build_rules(["a", "b"], ["/pgdata/x"], 0, 1000, match_all=True)
    assert [r.name for r in rules] == [
        "pattern 'a'",
        "pattern 'b'",
        "data dir /pgdata/x",
        "all postmasters",
    ]
    assert {(r.score, r.children_score) for r in rules} == {(0, 1000)}


def test_data_dirs_normalized() -> None:
    settings = make_settings(data_dirs=["/pgdata//pg16/"], score=0)
    assert settings.data_dirs == ["/pgdata/pg16"]
    assert settings.rules[-1].data_dir == "/pgdata/pg16"
