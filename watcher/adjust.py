"""The only writer: verify the process is still the one we examined, write, read back."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

from watcher.errors import AccessDenied, ProcessGone
from watcher.limits import CAP_DAC_OVERRIDE, CAP_SYS_RESOURCE
from watcher.parse import capability_set, has_capability, status_uids
from watcher.procfs import ProcFS


class Outcome(enum.Enum):
    ADJUSTED = "adjusted"
    UNCHANGED = "unchanged"  # already at the target: writing is idempotent, we skip it
    DRY_RUN = "dry-run"
    GONE = "gone"  # exited, or the PID now names another process
    DENIED = "denied"


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    pid: int
    old: Optional[int] = None
    new: Optional[int] = None
    reason: str = ""


class Adjuster:
    def __init__(self, procfs: ProcFS, dry_run: bool = False) -> None:
        self.procfs = procfs
        self.dry_run = dry_run

    def set_score(
        self, pid: int, starttime_ticks: int, score: int, only_lower: bool = False
    ) -> Result:
        """Set oom_score_adj of (pid, starttime) to `score`. Never raises for a vanished or
        protected process: the outcome says what happened.

        With `only_lower`, a process already at or below `score` is left alone: a
        postmaster that kubelet put at -997 (Guaranteed QoS) or an operator at -1000 is
        better protected than the target, and raising it would weaken it."""
        try:
            if self.procfs.stat(pid).starttime_ticks != starttime_ticks:
                return Result(Outcome.GONE, pid, reason="pid reused by another process")
            old = self.procfs.oom_score_adj(pid)
            if old == score or (only_lower and old < score):
                return Result(Outcome.UNCHANGED, pid, old, old)
            if self.dry_run:
                return Result(Outcome.DRY_RUN, pid, old, old)
            try:
                self.procfs.write_oom_score_adj(pid, score)
            except AccessDenied:
                return Result(Outcome.DENIED, pid, old, old, self.explain_denied(pid, old, score))
            new = self.procfs.oom_score_adj(pid)
        except ProcessGone as err:
            return Result(Outcome.GONE, pid, reason=str(err))
        if new != score:
            return Result(
                Outcome.DENIED, pid, old, new, f"the kernel kept {new} instead of {score}"
            )
        return Result(Outcome.ADJUSTED, pid, old, new)

    def explain_denied(self, pid: int, old: int, score: int) -> str:
        """Name the cause of EACCES and the fix, from this process's own capabilities."""
        try:
            own = self.procfs.self_status()
            effective = capability_set(own, "CapEff")
            bounding = capability_set(own, "CapBnd")
            own_uid = status_uids(own)[1]
            target_uid = status_uids(self.procfs.status(pid))[1]
        except (ProcessGone, AccessDenied, KeyError, ValueError):
            return f"cannot write oom_score_adj of pid {pid}"
        if own_uid != target_uid and not has_capability(effective, CAP_DAC_OVERRIDE):
            return (
                f"cannot write oom_score_adj of pid {pid} (uid {target_uid}) as uid {own_uid} "
                "without CAP_DAC_OVERRIDE: run pgoom as root with that capability"
            )
        if score < old and not has_capability(effective, CAP_SYS_RESOURCE):
            where = (
                "its bounding set"
                if not has_capability(bounding, CAP_SYS_RESOURCE)
                else "its effective set"
            )
            return (
                f"cannot lower oom_score_adj of pid {pid} from {old} to {score}: below the "
                f"process's floor (oom_score_adj_min) the kernel requires CAP_SYS_RESOURCE, "
                f"missing from {where}; add it (docker run --cap-add SYS_RESOURCE, or "
                "securityContext.capabilities.add: [SYS_RESOURCE]) or choose a --score at or "
                "above the floor the container runtime set"
            )
        return f"the kernel refused oom_score_adj {score} for pid {pid}"
