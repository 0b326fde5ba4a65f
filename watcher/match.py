"""Which process is a postmaster, and which rule protects it. Pure: no I/O.

The facts are gathered by watcher.identity; this module only decides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from watcher.limits import score_problem
from watcher.parse import POSTGRES_BINARIES, PidFile, Stat, is_server_invocation


@dataclass(frozen=True)
class Rule:
    """Protect processes whose command line matches `pattern` (or whose data directory is
    `data_dir`; or, with neither, every verified postmaster) at `score`."""

    score: int
    pattern: Optional[re.Pattern[str]] = None
    data_dir: Optional[str] = None
    children_score: Optional[int] = None

    @property
    def name(self) -> str:
        if self.pattern is not None:
            return f"pattern {self.pattern.pattern!r}"
        if self.data_dir is not None:
            return f"data dir {self.data_dir}"
        return "all postmasters"

    def matches_cmdline(self, cmdline: str) -> bool:
        return self.pattern is not None and self.pattern.search(cmdline) is not None

    def matches(self, cmdline: str, data_dir: Optional[str]) -> bool:
        if self.pattern is not None:
            return self.pattern.search(cmdline) is not None
        if self.data_dir is not None:
            return data_dir is not None and data_dir.rstrip("/") == self.data_dir.rstrip("/")
        return True


def cmdline_text(argv: list[str]) -> str:
    return " ".join(argv)


def argv_binary(argv: list[str]) -> str:
    return argv[0].rsplit("/", 1)[-1] if argv else ""


def is_title_rewritten(argv: list[str]) -> bool:
    """PostgreSQL children overwrite their argv with 'postgres: <what>'; the postmaster
    keeps the command line it was started with."""
    return bool(argv) and argv[0].startswith(("postgres: ", "postmaster: "))


def might_be_postmaster(argv: list[str], rules: list[Rule]) -> Optional[Rule]:
    """The cheap first look at an exec'd process, from its command line alone: the first rule
    that could apply, or None. Rules that need the data directory or match any postmaster
    ask only that the binary be called postgres; watcher.identity confirms the rest."""
    if not argv or is_title_rewritten(argv):
        return None
    text = cmdline_text(argv)
    named_postgres = argv_binary(argv) in POSTGRES_BINARIES
    for rule in rules:
        if rule.pattern is not None:
            if rule.pattern.search(text) is not None:
                return rule
        elif named_postgres:
            return rule
    return None


# --- identity -------------------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    """What was read about one process, as gathered by watcher.identity.inspect()."""

    stat: Stat
    argv: list[str]
    uid: int
    binary: Optional[str]  # basename of /proc/<pid>/exe; None when it cannot be read
    data_dir: Optional[str]
    data_dir_uid: Optional[int]  # owner of the data directory; None when it cannot be stat'ed
    pidfile: Optional[PidFile]
    pidfile_state: str  # "ok", "missing" (or half-written), "unreadable"
    pidfile_names_live_postgres: bool = False  # it names another PID that is a live postgres
    binary_is_server: Optional[bool] = None  # by content (watcher.binary); None: not checked

    @property
    def pid(self) -> int:
        return self.stat.pid


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str
    confirmed: bool = False  # postmaster.pid names this PID: the strongest evidence


def confirm(facts: Facts) -> Verdict:
    """Decide whether `facts` describe a real postmaster. A look-alike never passes: the
    binary must be postgres, the owner must own the data directory, and a postmaster.pid
    that names another live postgres process rules this one out."""
    pid = facts.pid
    if facts.stat.state in ("Z", "X"):
        return Verdict(False, "zombie")
    if facts.binary is not None:
        if facts.binary not in POSTGRES_BINARIES:
            return Verdict(False, f"executable is {facts.binary}, not postgres")
        if facts.binary_is_server is False:
            return Verdict(False, f"executable {facts.binary} is not a PostgreSQL server binary")
    elif facts.stat.comm not in POSTGRES_BINARIES:
        return Verdict(False, f"command is {facts.stat.comm}, not postgres")
    if is_title_rewritten(facts.argv):
        return Verdict(False, "a backend or auxiliary process, not the postmaster")
    if not is_server_invocation(facts.argv):
        return Verdict(False, "a one-shot postgres invocation, not a server")
    if facts.data_dir is None:
        return Verdict(False, "no data directory (-D, PGDATA or working directory)")
    if facts.data_dir_uid is None:
        return Verdict(False, f"cannot stat data directory {facts.data_dir}")
    if facts.data_dir_uid != facts.uid:
        return Verdict(
            False,
            f"data directory {facts.data_dir} belongs to uid {facts.data_dir_uid}, "
            f"the process runs as uid {facts.uid}",
        )
    if facts.pidfile_state == "ok" and facts.pidfile is not None:
        if facts.pidfile.pid == pid:
            return Verdict(True, "postmaster.pid names it", confirmed=True)
        if facts.pidfile_names_live_postgres:
            return Verdict(False, f"postmaster.pid names running postmaster {facts.pidfile.pid}")
        if facts.binary is None:
            return Verdict(False, "executable unreadable and postmaster.pid is stale")
        return Verdict(True, f"stale postmaster.pid (pid {facts.pidfile.pid} gone)")
    if facts.binary is None:
        # Without the executable, only the lock file can tell a postmaster from a renamed
        # program: wait for PostgreSQL to write it (inotify and rescans come back).
        return Verdict(False, "executable unreadable and postmaster.pid not written yet")
    if facts.pidfile_state == "unreadable":
        return Verdict(
            True, "postgres binary, owner owns the data directory (postmaster.pid unreadable)"
        )
    return Verdict(
        True, "postgres binary, owner owns the data directory (postmaster.pid not written yet)"
    )


# --- the fallbacks and the roles, over a snapshot of processes ---------------------------


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    comm: str
    argv: list[str] = field(default_factory=list)

    @property
    def is_postgres(self) -> bool:
        return self.comm in POSTGRES_BINARIES or argv_binary(self.argv) in POSTGRES_BINARIES


def fallback_postmasters(procs: list[ProcInfo]) -> tuple[list[ProcInfo], str]:
    """When no pattern matched: (b) the postgres processes that are parents of other
    postgres processes and are not children of one, else (c) the only postgres process.
    Candidates only: each still has to pass confirm()."""
    postgres = [p for p in procs if p.is_postgres]
    pids = {p.pid for p in postgres}
    parent_pids = {p.ppid for p in postgres}
    parents = [
        p
        for p in postgres
        if p.pid in parent_pids and p.ppid not in pids and not is_title_rewritten(p.argv)
    ]
    if parents:
        return parents, "parent of postgres processes"
    if len(postgres) == 1:
        return postgres, "the only postgres process"
    return [], ""


_AUX_TITLES = (
    "checkpointer",
    "background writer",
    "walwriter",
    "autovacuum launcher",
    "autovacuum worker",
    "logical replication launcher",
    "logical replication worker",
    "logical replication apply worker",
    "archiver",
    "stats collector",
    "startup",
    "walreceiver",
    "walsummarizer",
    "io worker",
    "slotsync worker",
    "parallel worker",
)


def role_of(argv: list[str], is_postmaster: bool) -> str:
    """postmaster, aux (checkpointer, walwriter, ...) or backend, from the process title."""
    if is_postmaster:
        return "postmaster"
    if not is_title_rewritten(argv):
        return "other"
    title = " ".join(argv).split(": ", 1)[1]
    # With cluster_name set (Patroni sets it) the title reads 'postgres: <cluster>: <what>'.
    candidates = [title]
    if ": " in title:
        candidates.append(title.split(": ", 1)[1])
    for text in candidates:
        # Whole words only: a cluster named 'startup-db' is not the startup process.
        if any(text == aux or text.startswith(aux + " ") for aux in _AUX_TITLES):
            return "aux"
    return "backend"


def validate_score(value: int, option: str = "--score") -> int:
    problem = score_problem(value)
    if problem:
        from watcher.errors import UsageError

        raise UsageError(f"{option} {problem}")
    return value
