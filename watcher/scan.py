"""One pass over /proc naming the processes to examine: those a rule may cover, or, when no
rule's first look matched anything, the seed's fallback candidates (the postgres process
that is the parent of others, else the only one). Pure selection by command line and
parentage; watcher.identity and watcher.match.confirm still decide. Used by the watcher's
scans, `pgoom verify` and the discovery of data directories for inotify."""

from __future__ import annotations

from dataclasses import dataclass

from watcher.errors import AccessDenied, ProcessGone
from watcher.match import (
    ProcInfo,
    Rule,
    argv_binary,
    fallback_postmasters,
    is_title_rewritten,
    might_be_postmaster,
)
from watcher.parse import POSTGRES_BINARIES
from watcher.procfs import ProcFS

PATTERN = "pattern"


@dataclass(frozen=True)
class Candidate:
    pid: int
    argv: list[str]
    method: str  # PATTERN, or the fallback that named it


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
