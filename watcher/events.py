"""What the engine tells its listeners (metrics, systemd notification, the outcome log).

Not to be confused with watcher.sources.base's events, which are what a source tells the
engine. Every notice is a small frozen dataclass; a listener is a function of one.
`protected` is the number of postmasters the engine protects once the notice applies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Union


@dataclass(frozen=True)
class Ready:
    """Subscribed and the first scan of /proc done."""

    source: str
    protected: int


@dataclass(frozen=True)
class Rescanned:
    reason: str


@dataclass(frozen=True)
class Adjusted:
    """A postmaster's score was written: on discovery (method: the rule's "pattern" or the
    fallback that named it), or set back after drift (method "drift")."""

    pid: int
    data_dir: Optional[str]
    old: Optional[int]
    new: int
    source: str
    latency_us: Optional[int]
    method: str
    protected: int


@dataclass(frozen=True)
class Kept:
    """A postmaster found that needed no write: already at or below the target
    (dry_run=False), or only reported (dry_run=True)."""

    pid: int
    start: int  # start time in clock ticks: with pid, the process's identity
    data_dir: Optional[str]
    old: Optional[int]
    target: int
    dry_run: bool


@dataclass(frozen=True)
class Refused:
    """A process a rule covers that is not a real postmaster (watcher.match.confirm)."""

    pid: int
    start: int
    cmdline: str  # bounded, for the log
    reason: str


@dataclass(frozen=True)
class Failed:
    """The kernel refused the write (e.g. below the floor without CAP_SYS_RESOURCE)."""

    pid: int
    start: int
    data_dir: Optional[str]
    reason: str  # the kind, for metrics labels: "denied"
    message: str  # what to fix, for the log
    protected: int


@dataclass(frozen=True)
class ChildAdjusted:
    pid: int
    start: int
    parent: int
    old: Optional[int]
    new: Optional[int]
    denied: str = ""  # the refusal's message when the kernel refused


@dataclass(frozen=True)
class GroupKillNote:
    """What the group-kill policy did or could not do for one postmaster (watcher.policy):
    the one line that says why its score is not the configured one, the warning that it
    will not survive, or the error that names what to grant."""

    pid: int
    start: int
    key: str  # "group-kill-note" or "group-kill-error": each logged once per postmaster
    level: str  # "info", "warning", "error"
    message: str


@dataclass(frozen=True)
class ChildOffMinus1000:
    """A child found at -1000 beside a postmaster at -1000, moved to the children score."""

    pid: int
    parent: int
    new: int


@dataclass(frozen=True)
class Exited:
    pid: int
    data_dir: Optional[str]
    protected: int


Notice = Union[
    Ready,
    Rescanned,
    Adjusted,
    Kept,
    Refused,
    Failed,
    ChildAdjusted,
    GroupKillNote,
    ChildOffMinus1000,
    Exited,
]
Listener = Callable[[Notice], None]
