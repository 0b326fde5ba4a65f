"""`pgoom adjust PID`: one write, with the same identity checks as the watcher."""

from __future__ import annotations

from watcher.adjust import Adjuster, Outcome
from watcher.errors import AccessDenied, NotPostmaster, ProcessGone
from watcher.identity import inspect
from watcher.match import confirm, validate_score
from watcher.procfs import ProcFS


def adjust_once(pid: int, score: int, force: bool = False, procfs: ProcFS | None = None) -> str:
    validate_score(score)
    procfs = procfs or ProcFS()
    try:
        stat = procfs.stat(pid)
    except ProcessGone:
        raise ProcessGone(f"no process with pid {pid}") from None
    if not force:
        try:
            facts = inspect(procfs, pid, stat=stat)
        except ProcessGone:
            raise ProcessGone(f"pid {pid} exited") from None
        except AccessDenied as err:
            raise AccessDenied(f"cannot inspect pid {pid} ({err}): run as root") from None
        verdict = confirm(facts)
        if not verdict.ok:
            raise NotPostmaster(
                f"pid {pid} is not a postmaster: {verdict.reason} (use --force to adjust anyway)"
            )
    result = Adjuster(procfs).set_score(pid, stat.starttime_ticks, score)
    if result.outcome is Outcome.GONE:
        raise ProcessGone(f"pid {pid} exited")
    if result.outcome is Outcome.DENIED:
        raise AccessDenied(result.reason)
    return f"pid {pid}: oom_score_adj {result.old} -> {result.new}"
