"""docs/architecture.md's package map is true: every module of watcher/ has a row, and
every import of a pgoom module (at the top or inside a function) is one its row allows."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "watcher"
# What the start path must never pull in (pyproject's dependencies and what they bring).
THIRD_PARTY = {"typer", "click", "loguru", "psutil", "pyroute2", "prometheus_client", "tomli"}


def rows() -> list[tuple[list[str], list[str]]]:
    """(owners, allowed) for each row of the map: names as written, e.g. `sources/`."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    found = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            found.append((re.findall(r"`([^`]+)`", cells[0]), re.findall(r"`([^`]+)`", cells[2])))
    return found


def relative(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def covers(name: str, module: str) -> bool:
    """Does the map's `name` (a file, or a folder ending in /) name `module` (a path)?"""
    return module.startswith(name) if name.endswith("/") else module == name


def module_path(dotted: str) -> str:
    """watcher.sources.base -> sources/base.py; watcher.commands -> commands/__init__.py."""
    parts = dotted.split(".")[1:]
    if (PACKAGE.joinpath(*parts) / "__init__.py").exists():
        return "/".join([*parts, "__init__.py"])
    return "/".join(parts) + ".py"


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(pgoom modules as paths, other top-level packages) imported anywhere in `path`."""
    ours: set[str] = set()
    others: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "watcher":  # `from watcher import x`: x may be a module
                names = [f"watcher.{a.name}" for a in node.names if a.name != "__version__"]
                names = [n for n in names if Path(module_path(n)).suffix == ".py"]
                names = [n for n in names if (PACKAGE / module_path(n)).exists()]
            else:
                names = [node.module]
        for name in names:
            if name == "watcher":
                continue
            if name.startswith("watcher."):
                ours.add(module_path(name))
            else:
                others.add(name.split(".")[0])
    return ours, others


MODULES = sorted(relative(p) for p in PACKAGE.rglob("*.py"))


def row_of(module: str) -> tuple[list[str], list[str]]:
    matches = [row for row in rows() if any(covers(name, module) for name in row[0])]
    assert len(matches) == 1, f"give watcher/{module} one row in docs/architecture.md"
    return matches[0]


def test_the_map_has_rows() -> None:
    assert len(rows()) > 10


@pytest.mark.parametrize("module", MODULES)
def test_imports_follow_the_map(module: str) -> None:
    owners, allowed = row_of(module)
    folder = module.rsplit("/", 1)[0] + "/" if "/" in module else None
    ours, _ = imports(PACKAGE / module)
    bad = sorted(
        dep
        for dep in ours
        if not (folder and dep.startswith(folder))
        and not any(covers(name, dep) for name in allowed)
        and not any(covers(name, dep) for name in owners)
    )
    assert not bad, f"watcher/{module} imports {bad}: not allowed by docs/architecture.md"


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("exec/")] + ["limits.py"])
def test_the_start_path_is_standard_library_only(module: str) -> None:
    _, others = imports(PACKAGE / module)
    assert not others & THIRD_PARTY, f"watcher/{module} imports {sorted(others & THIRD_PARTY)}"


def test_a_forbidden_import_is_caught(tmp_path: Path) -> None:
    """Guard the guard: an import the map does not allow is seen, also inside a function."""
    sample = tmp_path / "x.py"
    sample.write_text("def f():\n    from watcher.cli import app\n")
    assert imports(sample)[0] == {"cli.py"}
    assert not any(covers(name, "cli.py") for name in row_of("exec/entrypoint.py")[1])
