"""The group-kill policy applied to one postmaster: read its memory cgroup (watcher.memcg),
decide (watcher.groupkill), clear memory.oom.group where *ungroup* says so, and hand the
engine the score to write. Status, verify, doctor and the metrics describe a postmaster
with `describe()`, from the same reads, so every command tells the same truth.

Never raises for a postmaster that vanished or a cgroup that cannot be read: a policy that
cannot be applied is an error *message* (one per postmaster, the engine logs it once), and
protection goes on with the score the plan gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from watcher import groupkill
from watcher.errors import AccessDenied, ProcessGone
from watcher.groupkill import CgroupFacts, Plan, Policy
from watcher.memcg import CgroupReport, CgroupView
from watcher.parse import environ_value
from watcher.procfs import ProcFS

_NO_CGROUP = CgroupReport(None, None, None)


@dataclass(frozen=True)
class Applied:
    """What the policy did for one postmaster, before its score is written."""

    plan: Plan
    facts: CgroupFacts
    report: CgroupReport
    ungrouped: bool = False  # memory.oom.group was written 0 and reads 0 now
    errors: list[str] = field(default_factory=list)  # what to grant; logged once each


class GroupKillPolicy:
    def __init__(
        self, procfs: ProcFS, policy: Policy, dry_run: bool = False, fs_root: str = ""
    ) -> None:
        self.procfs = procfs
        self.policy = policy
        self.dry_run = dry_run
        self.view = CgroupView(procfs, fs_root)

    def observe(self, pid: int) -> CgroupReport:
        try:
            return self.view.observe(pid)
        except (ProcessGone, AccessDenied, OSError):
            return _NO_CGROUP

    def exported_children_value(self, pid: int) -> Optional[int]:
        """PG_OOM_ADJUST_VALUE where the postmaster exported it with PG_OOM_ADJUST_FILE
        (its children write it themselves); None where not, or unreadable (environ of
        another user's process needs CAP_SYS_PTRACE). Bounded: an int in the score range."""
        try:
            raw = self.procfs.environ(pid)
        except (ProcessGone, AccessDenied, OSError):
            return None
        if not environ_value(raw, "PG_OOM_ADJUST_FILE"):
            return None
        text = (environ_value(raw, "PG_OOM_ADJUST_VALUE") or "0").strip()
        if len(text) > 6 or not text.lstrip("-").isdigit():
            return None
        value = int(text)
        return value if -1000 <= value <= 1000 else None

    def apply(self, pid: int, score: int, children_score: Optional[int]) -> Applied:
        """Read the postmaster's cgroup, decide, and clear the flag where the plan says so."""
        report = self.observe(pid)
        facts = groupkill.facts_from(report)
        exported = self.exported_children_value(pid)
        plan = groupkill.plan(self.policy, score, children_score, facts, exported, pid)
        errors: list[str] = []
        ungrouped = False
        if plan.ungroup and not self.dry_run:
            cgroup = report.cgroup
            assert cgroup is not None  # plan.ungroup needs a visible cgroup
            try:
                self.view.write_oom_group(cgroup, False)
            except (AccessDenied, OSError) as err:
                errors.append(groupkill.cannot_ungroup_message(pid, facts, _reason(err)))
            else:
                report = self.observe(pid)
                facts = groupkill.facts_from(report)
                ungrouped = facts.own_oom_group is False
                if not ungrouped:
                    errors.append(
                        groupkill.cannot_ungroup_message(
                            pid, facts, "memory.oom.group still reads 1 after writing 0"
                        )
                    )
        elif self.policy is Policy.UNGROUP and plan.group_kill is not False and not plan.ungroup:
            errors.append(
                groupkill.cannot_ungroup_message(pid, facts, "nothing of its own to clear")
            )
        return Applied(plan, facts, report, ungrouped, errors)


def _reason(err: Exception) -> str:
    text = str(err)
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror
    return text[:200]


def describe(report: CgroupReport, score: Optional[int]) -> dict[str, Any]:
    """The cgroup fields of a postmaster for status/verify/doctor (--json): where it is, its
    memory now, whether its cgroup kills as a group and whether this score survives that."""
    facts = groupkill.facts_from(report)
    group = groupkill.kills_as_group(facts)
    cgroup, state = report.cgroup, report.state
    doc: dict[str, Any] = {
        "version": None if cgroup is None else cgroup.version,
        "path": None if cgroup is None else cgroup.path,
        "directory": None if cgroup is None else cgroup.directory,
        "limit_bytes": None if state is None else state.limit_bytes,
        "effective_limit_bytes": None if state is None else state.effective_limit_bytes,
        "usage_bytes": None if state is None else state.usage_bytes,
        "working_set_bytes": None if state is None else state.working_set_bytes,
        "oom_group": None if state is None else state.oom_group,
        "group_kill_at": report.group_kill_at,
        "group_kill": group,
    }
    return {"cgroup": doc, "survives_group_kill": groupkill.survives_group_kill(score, group)}


def short(report: CgroupReport) -> str:
    """'v2 /kubepods.slice/...' for a table; '-' where no memory cgroup is known."""
    cgroup = report.cgroup
    if cgroup is None:
        return "-"
    return f"v{cgroup.version} {cgroup.path}" + ("" if cgroup.directory else " (not visible)")


def mib(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / (1 << 20):.0f}"


def survives_text(value: Optional[bool]) -> str:
    return "?" if value is None else ("yes" if value else "NO")
