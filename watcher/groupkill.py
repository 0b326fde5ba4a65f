"""What protects a postmaster whose memory cgroup kills as a group. Pure: decides on facts.

On cgroup v2 a cgroup with `memory.oom.group=1` (kubelet 1.28+ sets it on every container)
makes the OOM killer kill *every* task of that cgroup once it has chosen one victim in it,
except tasks at exactly -1000 (mm/oom_kill.c, oom_kill_memcg_member). The kernel looks
for the flag from the victim's cgroup up to the cgroup whose limit was hit (the root for a
host-wide OOM), so an ancestor's flag counts too. Measured in the VM: a postmaster at -900
dies with the backend; at -1000, or with the flag at 0, it survives.

Policies (`--group-kill`, PGOOM_GROUP_KILL, `group_kill` in the config file):

- auto (default): where the cgroup kills as a group, protect with -1000, and keep every
  child of the postmaster off -1000 (an unkillable runaway backend would leave the OOM
  killer nothing to kill): the children go to the children score.
- ungroup: write 0 to memory.oom.group of the postmaster's own cgroup and keep the
  configured score; the kernel then kills only the victim, as on cgroup v1.
- keep: change nothing; warn that the postmaster will not survive a group kill.

The engine gathers the facts (watcher.memcg), calls `plan()`, acts, and logs the plan's
one line; status, verify, doctor and metrics call `survives_group_kill()`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

from watcher.errors import UsageError
from watcher.limits import GROUP_KILL_POLICIES, OOM_SCORE_ADJ_MIN
from watcher.memcg import CgroupReport

# PostgreSQL's documented PG_OOM_ADJUST_VALUE, and what the pgoom image exports.
DEFAULT_CHILDREN_SCORE = 0


class Policy(enum.Enum):
    AUTO = "auto"
    UNGROUP = "ungroup"
    KEEP = "keep"


POLICIES = GROUP_KILL_POLICIES
DEFAULT_POLICY = Policy(POLICIES[0])
assert tuple(p.value for p in Policy) == POLICIES


def parse_policy(text: str, option: str = "--group-kill") -> Policy:
    try:
        return Policy(text.strip().lower())
    except ValueError:
        raise UsageError(
            f"{option} {text!r} is unknown: use one of {', '.join(POLICIES)}"
        ) from None


@dataclass(frozen=True)
class CgroupFacts:
    """What the decision needs to know about the postmaster's memory cgroup."""

    version: Optional[int]  # 1, 2; None: no memory cgroup known for the process
    path: Optional[str] = None  # as /proc/<pid>/cgroup names it
    directory: Optional[str] = None  # where it is in this mount namespace; None: not visible
    own_oom_group: Optional[bool] = None  # its memory.oom.group; None: v1 or unreadable
    group_kill_at: Optional[str] = None  # the highest directory up from it with the flag 1

    @property
    def visible(self) -> bool:
        return self.directory is not None


@dataclass(frozen=True)
class Plan:
    """What to do for one postmaster."""

    policy: Policy
    score: int  # the postmaster's target
    children_score: Optional[int]  # each child's target; None: leave the children alone
    ungroup: bool  # write memory.oom.group=0 in the postmaster's own cgroup first
    group_kill: Optional[bool]  # before acting; None: unknown
    note: Optional[str]  # the one line that says why (None: nothing differs)
    note_level: str = "info"


def facts_from(report: CgroupReport) -> CgroupFacts:
    cgroup, state = report.cgroup, report.state
    if cgroup is None:
        return CgroupFacts(None)
    return CgroupFacts(
        version=cgroup.version,
        path=cgroup.path,
        directory=cgroup.directory,
        own_oom_group=None if state is None else state.oom_group,
        group_kill_at=report.group_kill_at,
    )


def kills_as_group(facts: CgroupFacts) -> Optional[bool]:
    """True where an OOM may kill every task of the postmaster's cgroup; None where that
    cannot be seen (a v2 cgroup not visible here: under kubelet 1.28+ it does). A visible
    cgroup is decided by the walk up to the mount (memcg.highest_oom_group): the root
    cgroup has no memory.oom.group at all and never kills as a group, and a cgroup
    without the memory controller is charged to, and killed with, its ancestors."""
    if facts.version != 2:
        return False  # v1 has no group kill; no memory cgroup: nothing to kill as a group
    if facts.group_kill_at is not None:
        return True
    if facts.directory is None:
        return None
    return False


def _where(facts: CgroupFacts) -> str:
    return facts.group_kill_at or facts.path or "its cgroup"


def children_target(configured: Optional[int], exported: Optional[int]) -> tuple[int, str]:
    """The children's score beside a postmaster at -1000, and where it comes from: the
    configured --children-score, else the PG_OOM_ADJUST_VALUE the postmaster exported
    (its children write it themselves), else PostgreSQL's documented 0. Never -1000."""
    for value, origin in (
        (configured, "--children-score"),
        (exported, "PG_OOM_ADJUST_VALUE"),
    ):
        if value is not None and value > OOM_SCORE_ADJ_MIN:
            return value, origin
    return DEFAULT_CHILDREN_SCORE, "default"


def plan(
    policy: Policy,
    score: int,
    children_score: Optional[int],
    facts: CgroupFacts,
    exported_children_value: Optional[int] = None,
    pid: Optional[int] = None,
) -> Plan:
    """Decide the postmaster's score, its children's, and whether to clear the flag."""
    who = f"postmaster pid={pid}" if pid is not None else "postmaster"
    group = kills_as_group(facts)
    kept_children = children_score
    if score == OOM_SCORE_ADJ_MIN:
        # Configured -1000 already: the children must still not stay there.
        kept_children, _ = children_target(children_score, exported_children_value)
    if group is False:
        return Plan(policy, score, kept_children, False, False, None)
    if policy is Policy.KEEP:
        if score == OOM_SCORE_ADJ_MIN:
            return Plan(policy, score, kept_children, False, group, None)
        verb = "kills" if group else "may kill (memory.oom.group not visible here)"
        return Plan(
            policy,
            score,
            kept_children,
            False,
            group,
            f"{who}: {_where(facts)} {verb} as a group and --group-kill keep leaves "
            f"oom_score_adj at {score}: it will NOT survive a group kill (only -1000 does); "
            "use --group-kill auto or ungroup",
            "warning",
        )
    if policy is Policy.UNGROUP:
        if not (facts.own_oom_group and facts.directory):
            # Nothing of its own to clear (not visible, or the flag is an ancestor's): keep
            # the score; the engine reports what to grant (cannot_ungroup_message).
            return Plan(policy, score, kept_children, False, group, None)
        note = (
            f"{who}: memory.oom.group=0 in {facts.path} (--group-kill ungroup), "
            f"oom_score_adj stays {score}"
        )
        if facts.group_kill_at != facts.directory:
            # An ancestor's flag is not this cgroup's to change.
            note += f"; {facts.group_kill_at} above it still kills as a group"
        return Plan(policy, score, kept_children, True, group, note)
    # auto
    target = OOM_SCORE_ADJ_MIN
    kids, origin = children_target(children_score, exported_children_value)
    if group:
        why = f"{_where(facts)} has memory.oom.group=1"
    else:
        why = (
            f"memory.oom.group of {facts.path} is not visible here (cgroup v2: kubelet 1.28+ "
            "sets it to 1)"
        )
    note = (
        f"{who}: oom_score_adj {target} instead of {score}: {why} and a group kill spares "
        f"only -1000 (--group-kill auto); children to {kids} ({origin})"
    )
    return Plan(policy, target, kids, False, group, note)


def survives_group_kill(score: Optional[int], group_kill: Optional[bool]) -> Optional[bool]:
    """Would a postmaster at `score` outlive an OOM kill in its cgroup? False/True where
    known, None where the flag cannot be seen and the score is above -1000."""
    if score is not None and score <= OOM_SCORE_ADJ_MIN:
        return True
    if group_kill is False:
        return True
    if group_kill is None or score is None:
        return None
    return False


def cannot_lower_message(pid: int, facts: CgroupFacts, reason: str) -> str:
    """The one error where auto's -1000 is refused; `reason` is the adjuster's, which
    already names the capability to grant."""
    return (
        f"postmaster pid={pid} will not survive a group kill in {_where(facts)} (only -1000 "
        f"does): {reason}; or, where pgoom may write the host's cgroupfs, --group-kill ungroup"
    )


def cannot_ungroup_message(pid: int, facts: CgroupFacts, reason: str) -> str:
    """The one error where ungroup cannot clear the flag."""
    if not facts.visible:
        what = (
            f"its cgroup {facts.path} is not visible from here (a sidecar sees only its own "
            "cgroup): run pgoom node-wide with the host's /sys/fs/cgroup mounted read-write"
        )
    elif facts.own_oom_group is False and facts.group_kill_at:
        what = (
            f"the group kill is set on {facts.group_kill_at}, above its own cgroup "
            f"{facts.path}, which pgoom does not change"
        )
    else:
        what = (
            f"{reason}; mount the host's /sys/fs/cgroup read-write into pgoom (DaemonSet: "
            "hostPath volume with readOnly: false) and run it as root"
        )
    return (
        f"postmaster pid={pid}: --group-kill ungroup cannot clear memory.oom.group: {what}; "
        "it will NOT survive a group kill, or use --group-kill auto with CAP_SYS_RESOURCE"
    )
