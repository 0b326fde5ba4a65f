"""The one small interface every event source implements, and the events it yields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Union


@dataclass(frozen=True)
class Examine:
    """Look at this PID: it exec'd (netlink), it was named in postmaster.pid (inotify), or
    it is new since the last scan (poll). `ts_ns` is CLOCK_MONOTONIC when the kernel or the
    source saw it happen (time.monotonic_ns() uses the same clock), 0 if unknown."""

    pid: int
    ts_ns: int = 0


@dataclass(frozen=True)
class Forked:
    """A new process (not a thread): with --children-score, children of a protected
    postmaster get that score."""

    parent: int
    child: int
    ts_ns: int = 0


@dataclass(frozen=True)
class Rescan:
    """Events may have been lost (ENOBUFS) or a directory appeared: scan /proc again."""

    reason: str


@dataclass(frozen=True)
class WatchDataDir:
    """Not an event: the engine tells sources about a data directory it learned of."""

    path: str


Event = Union[Examine, Forked, Rescan]


class Source(Protocol):
    name: str
    # True when the source announces forks (Forked events): the engine then needs no
    # periodic scan for the children of protected postmasters.
    reports_forks: bool

    def open(self) -> None:
        """Subscribe. Raises SourceUnavailable with the reason if this source cannot work
        here; the engine then tries the next one."""

    def fileno(self) -> Optional[int]:
        """A descriptor that becomes readable when read() has something, or None."""

    def timeout_s(self) -> Optional[float]:
        """Seconds until read() must be called even if fileno() stays quiet (the poll
        source's interval); None for a purely event-driven source."""

    def read(self) -> list[Event]:
        """Drain what is ready without blocking."""

    def add_data_dir(self, path: str) -> None:
        """A data directory the engine learned of (the inotify source watches it)."""

    def stats(self) -> dict[str, int]:
        """Counters for logs and metrics (events, lost, ...)."""

    def close(self) -> None:
        """Unsubscribe (netlink sends IGNORE) and release descriptors. Idempotent."""
