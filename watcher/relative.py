"""Relative protection: when the postmaster cannot be lowered, rank its children above it.

The OOM killer picks the task with the highest badness, roughly its memory plus
oom_score_adj/1000 of the memory it may use (the cgroup's limit in a memcg OOM, RAM in a
host-wide one). It never needs the postmaster to go *down*; it needs every other process of
the database to be above it. Lowering needs CAP_SYS_RESOURCE (or root and no runtime floor);
raising one's own score is always allowed. So when `pgoom exec` cannot lower itself (not
root, EACCES, a floor set by Docker or the kubelet), it exports a PG_OOM_ADJUST_VALUE above
its own score: the postmaster inherits our score, every child it forks (backends and
auxiliary processes) writes the value right after fork, with no privilege.

Why 1000 by default: a child at A_c outranks the postmaster at A_p exactly when
rss_c + A_c/1000 * limit > rss_p + A_p/1000 * limit, i.e. when A_c - A_p exceeds
1000 * (rss_p - rss_c) / limit. The postmaster measured 26.7 MB in a 300 MB memcg with PG 15
(docs/container.md): a gap of at least 90 there, more in a smaller container or with a larger
shared_buffers the postmaster touched. Only the largest gap is safe whatever the sizes, and
1000 is the largest any score allows. It must also outrank Patroni, PID 1 of the container at
the postmaster's score and larger than it (32 vs 21 MB measured by scripts/docker-e2e.sh):
killed, it takes the container and the postmaster with it. The price: in a host-wide OOM the
backends are the first victims on the whole host too (docs/container.md, "Relative
protection").

Only the standard library: `pgoom exec` imports this on the database's start path. The
decision is a pure function; the one reader is beside it.
"""

from __future__ import annotations

from watcher.limits import OOM_SCORE_ADJ_MAX, score_problem

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

DEFAULT_RELATIVE_SCORE = OOM_SCORE_ADJ_MAX
OFF_WORDS = ("off", "no", "false", "none")


class RelativeUsage(Exception):
    """--relative-score / PGOOM_RELATIVE_SCORE is not a score or `off`; str() says so."""


def parse_relative_score(text: str, option: str) -> Optional[int]:
    """A score -1000..1000, or None for `off`."""
    if text.strip().lower() in OFF_WORDS:
        return None
    try:
        value = int(text)
    except ValueError:
        raise RelativeUsage(
            f"{option} {text[:40]!r} is not a number: give -1000..1000 or off"
        ) from None
    problem = score_problem(value)
    if problem:
        raise RelativeUsage(f"{option} {problem}, or off")
    return value


def read_own_score(path: str = "/proc/self/oom_score_adj") -> Optional[int]:
    """Our oom_score_adj, which the postmaster will inherit; None when unreadable."""
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def children_value(
    own_score: Optional[int],
    target: int,
    children_score: int,
    relative_score: Optional[int],
    why: str,
) -> tuple[int, Optional[str]]:
    """PG_OOM_ADJUST_VALUE for the postmaster's children, and the one line to log (None:
    nothing to say).

    own_score: ours after the attempt to lower it (what the postmaster inherits); target:
    --score; children_score: --children-score; relative_score: --relative-score (None: off);
    why: why we could not lower (for the log line).
    """
    if own_score is None or own_score <= target:
        # Protected as asked (or we cannot tell): the children's documented value.
        return children_score, None
    if children_score > own_score:
        # The value asked for already ranks every child above the postmaster.
        return children_score, (
            f"pgoom: relative protection: the postmaster stays at oom_score_adj {own_score} "
            f"({why}); its children start at {children_score} (--children-score), above it"
        )
    if relative_score is None:
        return children_score, (
            f"pgoom: warning: the postmaster stays at oom_score_adj {own_score} ({why}) and "
            f"relative protection is off: its children start at {children_score}, no higher, "
            "so the postmaster may be the OOM killer's victim (--relative-score 1000 turns it on)"
        )
    if relative_score <= own_score:
        return children_score, (
            f"pgoom: warning: the postmaster stays at oom_score_adj {own_score} ({why}) and no "
            f"score above it is left for its children (--relative-score {relative_score}): "
            "nothing ranks them above the postmaster. A BestEffort pod runs at 1000: give "
            "it a memory request (docs/kubernetes.md)"
        )
    return relative_score, (
        f"pgoom: relative protection: the postmaster stays at oom_score_adj {own_score} "
        f"({why}); its children start at {relative_score} (PG_OOM_ADJUST_VALUE) so that the "
        "OOM killer takes a backend before the postmaster (--relative-score off disables it)"
    )
