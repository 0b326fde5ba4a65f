"""The fallbacks (parent of postgres processes, the only postgres process) guess, so
they are on only while the operator has not named what to protect."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_config_file import clean_env, run_resolve

__all__ = ["clean_env"]  # the autouse fixture: no PGOOM_* from the environment


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], True),
        (["--pattern", "postgres -D /data/main"], False),
        (["--data-dir", "/pgdata/pg16"], False),
        (["--pattern", "x", "--fallback"], True),
        (["--no-fallback"], False),
    ],
)
def test_fallback_default_follows_the_rules_given(args: list[str], expected: bool) -> None:
    assert run_resolve(args).settings.fallback is expected


def test_rules_from_the_config_file_also_turn_it_off(tmp_path: Path) -> None:
    config = tmp_path / "pgoom.toml"
    config.write_text('[[rule]]\npattern = "postgres -D /srv/pg"\n')
    assert run_resolve([], str(config)).settings.fallback is False


def test_the_env_var_decides_when_no_option_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGOOM_FALLBACK", "true")
    assert run_resolve(["--pattern", "x"]).settings.fallback is True
