"""Which process is a postmaster, and which rule protects it. Pure: no I/O.

The facts are gathered by watcher.identity; this module only decides.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Optional

from watcher.limits import score_problem
from watcher.parse import (
    POSTGRES_BINARIES,
    PidFile,
    Stat,
    data_dir_from_argv,
    is_server_invocation,
)
from watcher.untrusted import shown


def subject(data_dir: str) -> str:
    """What a pattern is searched in: `postgres -D <data directory>`, the data directory
    resolved as the postmaster sees it (no '..', no symlinks; watcher.identity)."""
    return f"postgres -D {data_dir}"


@dataclass(frozen=True)
class Rule:
    """Protect postmasters whose resolved data directory `pattern` finds in
    subject(data_dir) (or that is `data_dir`; or, with neither, every verified postmaster)
    at `score`."""

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

    def covers(self, data_dir: Optional[str]) -> bool:
        """Does this rule cover a postmaster whose data directory resolves to `data_dir`?
        Never decided on the command line: argv is the process's own text."""
        if self.pattern is not None:
            return data_dir is not None and self.pattern.search(subject(data_dir)) is not None
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
    that could apply, or None. Only a command named postgres that runs a server is worth a
    look (`bash -c '... postgres -D /pgdata/pg16'`, `env ... postgres` are not: their own
    exec of postgres comes next). A pattern rule also asks that `-D` name, spelled out, a
    directory it could cover; the rule is decided on the resolved directory afterwards
    (Rule.covers), this only spares the thousands of other execs the reads."""
    if (
        not argv
        or is_title_rewritten(argv)
        or argv_binary(argv) not in POSTGRES_BINARIES
        or not is_server_invocation(argv)
    ):
        return None
    named = data_dir_from_argv(argv)
    spelled = posixpath.normpath(named) if named and named.startswith("/") else None
    for rule in rules:
        if rule.pattern is None:
            return rule
        if spelled is not None and rule.covers(spelled):
            return rule
    return None


# --- identity -------------------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    """What was read about one process, as gathered by watcher.identity.inspect()."""

    stat: Stat
    argv: list[str]
    uid: int  # real uid
    binary: Optional[str]  # basename of /proc/<pid>/exe; None when it cannot be read
    data_dir: Optional[str]  # resolved as the process sees it (watcher.identity)
    data_dir_uid: Optional[int]  # owner of the data directory; None when it cannot be stat'ed
    pidfile: Optional[PidFile]
    pidfile_state: str  # "ok", "missing" (or half-written), "unreadable", "single-user"
    pidfile_names_live_postgres: bool = False  # it names another PID that is a live postgres
    binary_is_server: Optional[bool] = None  # by content (watcher.binary); None: not checked
    binary_trusted: Optional[bool] = None  # by ownership (watcher.binary); None: not judged
    binary_distrust: str = ""  # why it is not trusted
    uids_agree: bool = True  # real, effective, saved and file-system uid are one

    @property
    def pid(self) -> int:
        return self.stat.pid


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str
    confirmed: bool = False  # postmaster.pid names this PID: the strongest evidence
    cause: str = ""  # a short name of the refusal: the watcher logs each cause once


def _unjudged(facts: Facts) -> str:
    if facts.binary is None:
        return "executable unreadable"
    return f"executable not judged ({facts.binary_distrust})"


def _no(cause: str, reason: str) -> Verdict:
    return Verdict(False, reason, cause=cause)


def confirm(facts: Facts) -> Verdict:
    """Decide whether `facts` describe a real postmaster. A look-alike never passes: the
    executable must be a PostgreSQL server only root could have installed (or one the
    operator listed), the process's uids must be one and own the data directory, and a
    postmaster.pid that names another live postgres process rules this one out."""
    pid = facts.pid
    if facts.stat.state in ("Z", "X"):
        return _no("zombie", "zombie")
    if facts.binary is not None:
        if facts.binary not in POSTGRES_BINARIES:
            return _no("binary-name", f"executable is {shown(facts.binary)}, not postgres")
        if facts.binary_trusted is False:
            return _no("binary-untrusted", f"untrusted executable: {facts.binary_distrust}")
        if facts.binary_is_server is False:
            return _no(
                "binary-content",
                f"executable {shown(facts.binary)} is not a PostgreSQL server binary",
            )
    elif facts.stat.comm not in POSTGRES_BINARIES:
        return _no("binary-name", f"command is {shown(facts.stat.comm)}, not postgres")
    if is_title_rewritten(facts.argv):
        return _no("backend", "a backend or auxiliary process, not the postmaster")
    if not is_server_invocation(facts.argv):
        return _no("one-shot", "a one-shot postgres invocation, not a server")
    if not facts.uids_agree:
        return _no("uids", "its real, effective, saved and file-system uids differ")
    if facts.data_dir is None:
        return _no("no-data-dir", "no data directory (-D, PGDATA or working directory)")
    where = shown(facts.data_dir)
    if facts.data_dir_uid is None:
        return _no("data-dir", f"cannot stat data directory {where} (or not a directory)")
    if facts.data_dir_uid != facts.uid:
        return _no(
            "data-dir-owner",
            f"data directory {where} belongs to uid {facts.data_dir_uid}, "
            f"the process runs as uid {facts.uid}",
        )
    if facts.pidfile_state == "single-user":
        return _no("single-user", f"a single-user backend holds {where}")
    # Without the executable judged (unreadable, or its path out of reach), only the lock
    # file can tell a postmaster from a renamed program.
    judged = facts.binary is not None and facts.binary_trusted is True
    if facts.pidfile_state == "ok" and facts.pidfile is not None:
        if facts.pidfile.pid == pid:
            return Verdict(True, "postmaster.pid names it", confirmed=True)
        if facts.pidfile_names_live_postgres:
            return _no("locked", f"postmaster.pid names running postmaster {facts.pidfile.pid}")
        if not judged:
            return _no("stale-unjudged", f"{_unjudged(facts)} and postmaster.pid is stale")
        return Verdict(True, f"stale postmaster.pid (pid {facts.pidfile.pid} gone)")
    if not judged:
        # Inotify and rescans come back when PostgreSQL writes the lock file.
        return _no("unjudged", f"{_unjudged(facts)} and postmaster.pid not written yet")
    # Accepting a process before its postmaster.pid exists is what protects a postmaster
    # before it forks (a child forked earlier keeps the container's floor, FACTS), and it
    # is safe: everything but the lock file is already proved — a server binary only root
    # installed, run by the owner of a data directory a rule covers, with no live
    # postmaster holding that directory. Such a process can only be started by that
    # directory's owner, who can already make its real postmaster run any code it likes
    # (its own postgresql.conf, LD_PRELOAD in its own environment): waiting for a file the
    # owner could write itself would add latency and no protection. What stays out is
    # everyone else: other users (not the owner), other directories (not covered), a
    # second process on a locked directory, one-shot invocations and single-user backends.
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
