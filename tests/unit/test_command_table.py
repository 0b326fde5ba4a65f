"""The commands are listed in one place (watcher.commands.COMMANDS): the CLI's help, the
tables of README.md and docs/index.md, and man/pgoom.1's COMMANDS section follow it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.main import get_command

from watcher.cli import app
from watcher.commands import COMMANDS

ROOT = Path(__file__).resolve().parents[2]


def table_rows(path: Path) -> list[tuple[str, str]]:
    text = path.read_text()
    return re.findall(r"^\| `(pgoom [^`]+)` \| (.+) \|$", text, flags=re.M)


def test_the_cli_registers_exactly_these_commands() -> None:
    commands = get_command(app).commands  # type: ignore[attr-defined]
    assert sorted(commands) == sorted(name for name, _, _ in COMMANDS)
    for name, _, summary in COMMANDS:
        assert commands[name].help.startswith(summary), name


@pytest.mark.parametrize("doc", ["README.md", "docs/index.md"])
def test_the_command_table_is_the_list(doc: str) -> None:
    expected = [(usage, summary) for _, usage, summary in COMMANDS]
    assert table_rows(ROOT / doc) == expected, f"copy watcher.commands.COMMANDS into {doc}"


def test_the_man_page_describes_every_command() -> None:
    man = (ROOT / "man" / "pgoom.1").read_text()
    found = re.search(r"^\.SH COMMANDS\n(.*?)(?=^\.SH )", man, flags=re.S | re.M)
    assert found
    described = re.findall(r"^\.TP\n\.B (\S+)$", found.group(1), flags=re.M)
    assert sorted(described) == sorted(name for name, _, _ in COMMANDS)
    synopsis = re.findall(r"^\.B pgoom (\S+)$", man, flags=re.M)
    assert sorted(set(synopsis)) == sorted(name for name, _, _ in COMMANDS)
