"""pgoom(1) and the reference pages stay true: every exit code in watcher/limits.py and
every `pgoom watch` option (and its PGOOM_* variable, and every config-file key) is
documented."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from watcher import limits
from watcher.cli import app
from watcher.options import FILE_KEYS, RULE_KEYS

ROOT = Path(__file__).resolve().parents[2]
EXIT_CODES = {
    name: value
    for name, value in vars(limits).items()
    if name.startswith("EXIT_") and isinstance(value, int)
}


def man_text() -> str:
    # roff writes a literal hyphen as \- ; compare in plain text.
    return (ROOT / "man" / "pgoom.1").read_text().replace("\\-", "-")


def section(text: str, title: str) -> str:
    found = re.search(rf"^\.SH {title}\n(.*?)(?=^\.SH |\Z)", text, flags=re.S | re.M)
    assert found, f"no .SH {title}"
    return found.group(1)


def watch_command() -> Any:
    # typer vendors its own click: look at the command by duck typing.
    return get_command(app).commands["watch"]  # type: ignore[attr-defined]


def watch_options() -> list[str]:
    names = []
    for param in watch_command().params:
        if param.param_type_name == "option":
            names += [*param.opts, *param.secondary_opts]
    return names


def watch_envvars() -> list[str]:
    found = set()
    for param in watch_command().params:
        if param.param_type_name == "option" and param.envvar:
            found.add(str(param.envvar))
    # --pattern and --data-dir read their variables themselves (explicit separators).
    return sorted(found | {"PGOOM_PATTERN", "PGOOM_DATA_DIR"})


def test_every_exit_code_is_in_exit_status() -> None:
    exit_status = section(man_text(), "EXIT STATUS")
    listed = {int(v) for v in re.findall(r"^\.B (\d+)$", exit_status, flags=re.M)}
    missing = {name: v for name, v in EXIT_CODES.items() if v not in listed}
    assert not missing, f"add to man/pgoom.1 EXIT STATUS: {missing}"


def test_the_help_lists_what_the_test_checks() -> None:
    """Guard the guard: the options come from the same command `pgoom watch --help` shows."""
    result = CliRunner().invoke(app, ["watch", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in watch_options():
        assert option in result.output, option


@pytest.mark.parametrize("option", watch_options())
def test_every_watch_option_is_in_the_man_page(option: str) -> None:
    assert option in section(man_text(), "WATCH OPTIONS"), f"add {option} to man/pgoom.1"


@pytest.mark.parametrize("envvar", watch_envvars())
def test_every_watch_variable_is_in_the_man_page(envvar: str) -> None:
    assert envvar in man_text(), f"add {envvar} to man/pgoom.1"


def configuration_md() -> str:
    return (ROOT / "docs" / "configuration.md").read_text()


@pytest.mark.parametrize("option", watch_options())
def test_every_watch_option_is_in_the_configuration_reference(option: str) -> None:
    assert f"`{option}" in configuration_md(), f"add {option} to docs/configuration.md"


@pytest.mark.parametrize("envvar", watch_envvars())
def test_every_variable_is_in_the_configuration_reference(envvar: str) -> None:
    assert f"`{envvar}`" in configuration_md(), f"add {envvar} to docs/configuration.md"


@pytest.mark.parametrize("key", sorted({*FILE_KEYS, *RULE_KEYS}))
def test_every_config_key_is_in_the_configuration_reference(key: str) -> None:
    assert f"`{key}`" in configuration_md(), f"add the key {key} to docs/configuration.md"


@pytest.mark.parametrize("name", sorted(EXIT_CODES))
def test_every_exit_code_is_in_docs_exit_codes(name: str) -> None:
    text = (ROOT / "docs" / "exit-codes.md").read_text()
    assert re.search(rf"^\|\s*{EXIT_CODES[name]}\s*\|", text, flags=re.M), (
        f"add {name} = {EXIT_CODES[name]} to docs/exit-codes.md"
    )
