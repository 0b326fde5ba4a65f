"""Finding postmasters: the one way every command does it (`pgoom watch`'s scans and
events, `pgoom verify`, `pgoom status`, and the data directories inotify watches).

Two steps. `candidates` is one pass over /proc naming the processes worth a closer look,
by command line and parentage only: those a rule may cover, or, when no rule's first look
matched anything and the fallbacks are on, the postgres process that is the parent of other
postgres processes, else the only postgres process. `judge` then gathers the facts
(watcher.identity.inspect), names the rule that covers the process and asks
watcher.match.confirm for the verdict. `discover` is the two together.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

from watcher.errors import AccessDenied, ProcessGone
from watcher.identity import inspect
from watcher.match import (
    Facts,
    ProcInfo,
    Rule,
    Verdict,
    argv_binary,
    cmdline_text,
    confirm,
    fallback_postmasters,
    is_title_rewritten,
    might_be_postmaster,
)
from watcher.parse import POSTGRES_BINARIES
from watcher.procfs import ProcFS

PATTERN = "pattern"  # the method of a candidate some rule's first look named


@dataclass(frozen=True)
class Candidate:
    pid: int
    argv: list[str]
    method: str  # PATTERN, or the fallback that named it


@dataclass(frozen=True)
class Finding:
    """One candidate, judged."""

    facts: Facts
    rule: Optional[Rule]  # the rule that protects it; None: no rule covers it
    method: str  # PATTERN, or the fallback that named it
    how: str  # the rule's name, or "fallback: <method>" when a fallback chose it
    verdict: Verdict

    @property
    def pid(self) -> int:
        return self.facts.pid

    @property
    def protectable(self) -> bool:
        """A rule covers it and it is a real postmaster."""
        return self.rule is not None and self.verdict.ok


def candidates(procfs: ProcFS, rules: list[Rule], fallback: bool) -> list[Candidate]:
    matched: list[Candidate] = []
    postgres: list[ProcInfo] = []
    for pid in procfs.pids():
        try:
            argv = procfs.cmdline(pid)
        except (ProcessGone, AccessDenied):
            continue
        if might_be_postmaster(argv, rules) is not None:
            matched.append(Candidate(pid, argv, PATTERN))
        elif (
            fallback
            and argv
            and (argv_binary(argv) in POSTGRES_BINARIES or is_title_rewritten(argv))
        ):
            try:
                stat = procfs.stat(pid)
            except (ProcessGone, AccessDenied):
                continue
            postgres.append(ProcInfo(pid, stat.ppid, stat.comm, argv))
    if matched or not postgres:
        return matched
    found, method = fallback_postmasters(postgres)
    return [Candidate(info.pid, info.argv, method) for info in found]


def judge(
    procfs: ProcFS, pid: int, argv: list[str], rules: list[Rule], method: str = PATTERN
) -> Optional[Finding]:
    """The facts, the covering rule and the verdict for one process; None when it exited
    or cannot be read. The first rule that matches covers it; a process a fallback named is
    covered by the first rule when none matches (the fallbacks exist for the default one)."""
    try:
        facts = inspect(procfs, pid, argv=argv)
    except (ProcessGone, AccessDenied):
        return None
    text = cmdline_text(facts.argv)
    rule = next((r for r in rules if r.matches(text, facts.data_dir)), None)
    how = rule.name if rule is not None else f"fallback: {method}"
    if rule is None and method != PATTERN:
        rule = rules[0]
    return Finding(facts=facts, rule=rule, method=method, how=how, verdict=confirm(facts))


def discover(procfs: ProcFS, rules: list[Rule], fallback: bool) -> Iterator[Finding]:
    """Every candidate on the host, judged."""
    for candidate in candidates(procfs, rules, fallback):
        finding = judge(procfs, candidate.pid, candidate.argv, rules, candidate.method)
        if finding is not None:
            yield finding
