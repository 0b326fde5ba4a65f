"""watcher.discover.candidates on a fake /proc: rule matches first; the fallbacks only
when no rule matched and only when asked for."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.fakeproc import FakeProc
from watcher.config import build_rules
from watcher.discover import PATTERN, candidates

ME = os.getuid()


@pytest.fixture
def tree(tmp_path: Path) -> FakeProc:
    fake = FakeProc(tmp_path)
    fake.install("postmaster", uid=ME)
    fake.install("backend", uid=ME)
    return fake


def test_the_default_pattern_names_the_postmaster(tree: FakeProc) -> None:
    found = candidates(tree.procfs, build_rules([], [], 0, None), fallback=True)
    assert [(c.method, c.argv[1]) for c in found] == [(PATTERN, "-D")]


def test_fallback_names_the_parent_when_no_rule_matched(tree: FakeProc) -> None:
    rules = build_rules(["no-such-command"], [], 0, None)
    found = candidates(tree.procfs, rules, fallback=True)
    assert [c.method for c in found] == ["parent of postgres processes"]
    assert not found[0].argv[0].startswith("postgres:")  # the postmaster, not the backend


def test_no_fallback_unless_asked(tree: FakeProc) -> None:
    rules = build_rules(["no-such-command"], [], 0, None)
    assert candidates(tree.procfs, rules, fallback=False) == []
