"""Which child of a postmaster the guard may stop, and which one it stops. Pure: no I/O.

PostgreSQL's postmaster classifies its children by type before it signals any of them; the
guard does the same, from the process title each child sets:

- a client backend reads `postgres: [cluster: ]<user> <database> <host> <activity>`, where
  <host> is `[local]` or `address(port)`;
- a parallel worker reads `postgres: [cluster: ]parallel worker for PID <leader>`: its
  memory is its leader's query, so it counts towards the leader and is never signalled
  itself (cancelling the leader stops the workers);
- everything else — walsenders (`walsender ...`), autovacuum, the checkpointer, background
  workers of extensions, titles the guard does not recognise — is never chosen.

The victim is the client backend with the most private memory (RssAnon + swap; RssShmem is
shared buffers it touched, which a cancel does not give back), if that is above a floor.

Whether the guard acts at all is decided by `kernel_choice`: the process the kernel's OOM
killer would take from the same memory group. When that is not PostgreSQL (a hog beside it),
the OOM kill costs PostgreSQL nothing and the guard stays out of the way; when it is a
backend or the postmaster, stopping one backend the way a DBA would is cheaper than the kill
and the crash restart that follows it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from watcher.match import is_title_rewritten, role_of

_HOST = re.compile(r"\[local\]|\S+\(\d{1,5}\)")
_PARALLEL = re.compile(r"parallel worker for PID (\d{1,10})")
TITLE_MAX_CHARS = 160

CLIENT = "client backend"
PARALLEL = "parallel worker"
WALSENDER = "walsender"
AUX = "auxiliary"  # checkpointer, autovacuum, ...: watcher.match's list of titles
OTHER = "other"  # a title the guard does not recognise


@dataclass(frozen=True)
class Kind:
    name: str  # CLIENT, PARALLEL, WALSENDER or OTHER
    leader: Optional[int] = None  # a parallel worker's leader


def _title_candidates(argv: list[str]) -> list[str]:
    title = " ".join(argv).split(": ", 1)[1]
    # With cluster_name set the title reads 'postgres: <cluster>: <what>'.
    candidates = [title]
    if ": " in title:
        candidates.append(title.split(": ", 1)[1])
    return candidates


def _kind_of(text: str) -> Kind:
    """One reading of a title (with or without a cluster name in front)."""
    text = text.strip()
    match = _PARALLEL.fullmatch(text)
    if match:
        return Kind(PARALLEL, leader=int(match.group(1)))
    words = text.split()
    if words and words[0] == WALSENDER:
        # A walsender streams to a replica or a subscriber: stopping it stalls replication.
        return Kind(WALSENDER)
    if role_of(["postgres: " + text], False) == "aux":
        return Kind(AUX)
    # user, database, then the host: a user or database name with spaces in it moves the
    # host further right, never to the left of position 2.
    if len(words) >= 3 and any(_HOST.fullmatch(w) for w in words[2:]):
        return Kind(CLIENT)
    return Kind(OTHER)


def classify(argv: list[str]) -> Kind:
    """What kind of child a postmaster's child is, from its title alone.

    Whether a cluster name precedes the rest cannot be told from the title, so both
    readings are taken, and a child is a client backend only if no reading says otherwise:
    `postgres: main: walsender postgres [local] streaming` reads as a client backend of
    user 'walsender' without its cluster name, and is a walsender."""
    if not is_title_rewritten(argv):
        return Kind(OTHER)
    kinds = [_kind_of(text) for text in _title_candidates(argv)]
    # Any reading that names another kind rules 'client' out; the specific kinds first
    # (watcher.match's list of auxiliary titles includes parallel workers).
    for name in (PARALLEL, WALSENDER, AUX):
        for kind in kinds:
            if kind.name == name:
                return kind
    if any(kind.name == CLIENT for kind in kinds):
        return Kind(CLIENT)
    return Kind(OTHER)


@dataclass(frozen=True)
class Child:
    """What was read about one child of the postmaster (watcher.guard.children)."""

    pid: int
    start_ticks: int
    argv: list[str]
    rss_anon_bytes: int
    swap_bytes: int
    rss_shmem_bytes: int = 0

    @property
    def private_bytes(self) -> int:
        return self.rss_anon_bytes + self.swap_bytes


@dataclass(frozen=True)
class Candidate:
    pid: int
    start_ticks: int
    title: str  # bounded and escaped: safe to log
    private_bytes: int  # its own plus its parallel workers'
    workers: int = 0
    idle: bool = False  # between statements: a cancel would do nothing


_IDLE_ENDINGS = ("idle", "idle in transaction", "idle in transaction (aborted)")


def is_idle(argv: list[str]) -> bool:
    """The backend is between statements (the title ends with its activity). PostgreSQL
    discards a cancel that arrives while a backend waits for the next command, so for an
    idle session only a terminate gives its memory back."""
    text = " ".join(argv).rstrip(" \0")
    return any(text.endswith(" " + ending) for ending in _IDLE_ENDINGS)


def candidates(children: list[Child]) -> list[Candidate]:
    """Every client backend of the postmaster as a possible victim, its parallel workers'
    memory counted towards it, largest first; ties go to the lower PID (deterministic, and
    the older of two equal queries has had its chance)."""
    kinds = {c.pid: classify(c.argv) for c in children}
    by_pid = {c.pid: c for c in children}
    totals: dict[int, int] = {}
    workers: dict[int, int] = {}
    for child in children:
        kind = kinds[child.pid]
        if kind.name == CLIENT:
            totals[child.pid] = totals.get(child.pid, 0) + child.private_bytes
        elif kind.name == PARALLEL and kind.leader is not None:
            leader = kinds.get(kind.leader)
            # Only a leader that is a client backend of this same postmaster: a worker's
            # title is not proof of anything about another process.
            if leader is not None and leader.name == CLIENT:
                totals[kind.leader] = totals.get(kind.leader, 0) + child.private_bytes
                workers[kind.leader] = workers.get(kind.leader, 0) + 1
    return [
        Candidate(
            pid,
            by_pid[pid].start_ticks,
            display_title(by_pid[pid].argv),
            totals[pid],
            workers.get(pid, 0),
            idle=is_idle(by_pid[pid].argv) and not workers.get(pid),
        )
        for pid in sorted(totals, key=lambda p: (-totals[p], p))
    ]


def above_floor(ranked: list[Candidate], floor_bytes: int) -> Optional[Candidate]:
    """The first of `candidates()`'s ranking if it holds more than `floor_bytes`."""
    if not ranked or ranked[0].private_bytes <= floor_bytes:
        return None
    return ranked[0]


def choose(children: list[Child], floor_bytes: int) -> Optional[Candidate]:
    """The client backend with the most private memory (its parallel workers' included),
    if above `floor_bytes`; None when no client backend qualifies."""
    return above_floor(candidates(children), floor_bytes)


def fastest_growing(
    before: dict[int, int], children: list[Child], min_growth_bytes: int
) -> Optional[Candidate]:
    """The running query (a client backend between BEGIN and the end of a statement, not
    idle) whose private memory grew the most since `before` (pid -> private bytes), if by
    at least `min_growth_bytes`: the query asking for memory now."""
    best: Optional[Candidate] = None
    best_growth = min_growth_bytes - 1
    for candidate in candidates(children):
        if candidate.idle or candidate.pid not in before:
            continue
        growth = candidate.private_bytes - before[candidate.pid]
        if growth > best_growth:
            best, best_growth = candidate, growth
    return best


@dataclass(frozen=True)
class Member:
    """A process the kernel's OOM killer could choose: one task of the memory group (or, for
    the host, of the system), with what mm/oom_kill.c's oom_badness() reads."""

    pid: int
    rss_bytes: int  # VmRSS: anon + file + shmem, all of which the kernel counts
    swap_bytes: int
    page_table_bytes: int
    score_adj: int
    # Killed and not yet gone (SIGKILL pending, or exiting without its memory map): the
    # kernel's OOM killer chooses nobody while a victim of its own is still dying.
    dying: bool = False

    def badness(self, total_bytes: int) -> Optional[int]:
        """oom_badness() in bytes: what the process holds plus oom_score_adj thousandths of
        the memory the OOM is about (the group's limit, or the host's RAM). None: never
        chosen (-1000)."""
        if self.score_adj <= -1000:
            return None
        held = self.rss_bytes + self.swap_bytes + self.page_table_bytes
        return held + self.score_adj * (total_bytes // 1000)


def kernel_choice(members: list[Member], total_bytes: int) -> Optional[Member]:
    """The member the kernel would kill if the group ran out of memory now, by the kernel's
    own arithmetic. Between equals the kernel keeps the last one its task walk meets, an
    order not visible from here; this keeps the lower PID. The process growing now only climbs this
    ranking until the OOM, so the choice made at the guard's threshold holds at the limit."""
    best: Optional[Member] = None
    best_points = 0
    for member in members:
        points = member.badness(total_bytes)
        if points is None:
            continue
        if (
            best is None
            or points > best_points
            or (points == best_points and member.pid < best.pid)
        ):
            best, best_points = member, points
    return best


def display_title(argv: list[str], limit: int = TITLE_MAX_CHARS) -> str:
    """A process title as it may appear in a log line: user and database names and the
    command tag are chosen by clients, so control characters, quotes and backslashes are
    escaped and the length is bounded (one line per action, whatever the client sent)."""
    text = " ".join(argv).rstrip()
    out: list[str] = []
    length = 0
    for char in text:
        if char == "\\":
            piece = "\\\\"
        elif char == '"':
            piece = '\\"'
        elif char.isprintable() and not ("\udc80" <= char <= "\udcff"):
            piece = char
        else:
            code = ord(char)
            if "\udc80" <= char <= "\udcff":  # a byte that was not UTF-8 (surrogateescape)
                code -= 0xDC00
            piece = f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
        if length + len(piece) > limit:
            out.append("...")
            break
        out.append(piece)
        length += len(piece)
    return "".join(out)
