"""watcher.groupkill: the policy decisions as pure functions on cgroup facts, and the facts
read from fake cgroup v2 trees (the real kernel's group kill is proven in the VM)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest

from watcher import groupkill
from watcher.errors import UsageError
from watcher.groupkill import CgroupFacts, Policy, plan, survives_group_kill
from watcher.memcg import CgroupReport, CgroupView, MemCgroup, MemoryState
from watcher.policy import GroupKillPolicy, describe
from watcher.procfs import ProcFS

POD = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podab.slice"
CONTAINER = f"{POD}/cri-containerd-db.scope"
V2_MOUNTINFO = "30 22 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"

V1 = CgroupFacts(1, "/pgtest", "/sys/fs/cgroup/memory/pgtest")
GROUP = CgroupFacts(2, CONTAINER, f"/sys/fs/cgroup{CONTAINER}", True, f"/sys/fs/cgroup{CONTAINER}")
UNGROUPED = CgroupFacts(2, CONTAINER, f"/sys/fs/cgroup{CONTAINER}", False, None)
SIDECAR = CgroupFacts(2, "/../cri-containerd-db.scope", None, None, None)
NONE = CgroupFacts(None)
ROOT = CgroupFacts(2, "/", "/sys/fs/cgroup", None, None)  # the root cgroup: no flag file
ANCESTOR = CgroupFacts(2, CONTAINER, f"/sys/fs/cgroup{CONTAINER}", False, f"/sys/fs/cgroup{POD}")
BOTH = CgroupFacts(2, CONTAINER, f"/sys/fs/cgroup{CONTAINER}", True, f"/sys/fs/cgroup{POD}")


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (V1, False),
        (NONE, False),
        (GROUP, True),
        (UNGROUPED, False),
        (SIDECAR, None),
        (ANCESTOR, True),
        (BOTH, True),
        (ROOT, False),
    ],
)
def test_kills_as_group(facts: CgroupFacts, expected: Optional[bool]) -> None:
    assert groupkill.kills_as_group(facts) is expected


@pytest.mark.parametrize("policy", list(Policy))
@pytest.mark.parametrize("facts", [V1, NONE, UNGROUPED, ROOT])
def test_no_group_kill_keeps_the_configured_scores(policy: Policy, facts: CgroupFacts) -> None:
    decided = plan(policy, -900, None, facts)
    assert (decided.score, decided.children_score, decided.ungroup) == (-900, None, False)
    assert decided.note is None


def test_auto_in_a_group_kill_cgroup_protects_with_minus_1000_and_children_at_0() -> None:
    decided = plan(Policy.AUTO, -900, None, GROUP, pid=42)
    assert decided.score == -1000
    assert decided.children_score == 0
    assert not decided.ungroup
    assert decided.note is not None
    # The one line names the pid, both scores and the cause.
    for part in ("pid=42", "-1000 instead of -900", "memory.oom.group=1", CONTAINER):
        assert part in decided.note


def test_auto_children_take_the_configured_then_the_exported_score() -> None:
    assert plan(Policy.AUTO, -900, 5, GROUP, exported_children_value=7).children_score == 5
    assert plan(Policy.AUTO, -900, None, GROUP, exported_children_value=7).children_score == 7


@pytest.mark.parametrize(("configured", "exported"), [(-1000, None), (None, -1000), (-1000, -1000)])
def test_no_child_is_left_at_minus_1000(configured: Optional[int], exported: Optional[int]) -> None:
    decided = plan(Policy.AUTO, -900, configured, GROUP, exported_children_value=exported)
    assert decided.children_score == 0


@pytest.mark.parametrize("facts", [V1, GROUP, UNGROUPED])
def test_a_configured_minus_1000_always_moves_the_children(facts: CgroupFacts) -> None:
    decided = plan(Policy.KEEP, -1000, None, facts)
    assert (decided.score, decided.children_score) == (-1000, 0)


def test_auto_where_the_flag_is_not_visible_assumes_kubelet() -> None:
    decided = plan(Policy.AUTO, -900, None, SIDECAR)
    assert decided.score == -1000 and decided.group_kill is None
    assert decided.note is not None and "not visible" in decided.note


def test_auto_with_an_ancestor_flag() -> None:
    decided = plan(Policy.AUTO, -900, None, ANCESTOR)
    assert decided.score == -1000
    assert decided.note is not None and f"/sys/fs/cgroup{POD}" in decided.note


def test_ungroup_clears_only_its_own_flag_and_keeps_the_score() -> None:
    decided = plan(Policy.UNGROUP, -900, 0, GROUP)
    assert (decided.score, decided.children_score, decided.ungroup) == (-900, 0, True)
    assert decided.note is not None and "stays -900" in decided.note


def test_ungroup_says_an_ancestor_still_kills_as_a_group() -> None:
    decided = plan(Policy.UNGROUP, -900, None, BOTH)
    assert decided.ungroup
    assert decided.note is not None and "above it still kills as a group" in decided.note


@pytest.mark.parametrize("facts", [SIDECAR, ANCESTOR])
def test_ungroup_with_nothing_of_its_own_to_clear(facts: CgroupFacts) -> None:
    decided = plan(Policy.UNGROUP, -900, None, facts)
    assert (decided.score, decided.ungroup) == (-900, False)
    message = groupkill.cannot_ungroup_message(3, facts, "read-only file system")
    assert message.startswith("postmaster pid=3: --group-kill ungroup cannot clear")
    assert "NOT survive" in message


def test_ungroup_refused_names_the_mount_to_grant() -> None:
    message = groupkill.cannot_ungroup_message(3, GROUP, "read-only file system")
    assert "read-only file system" in message and "readOnly: false" in message


def test_keep_warns_that_it_will_not_survive() -> None:
    decided = plan(Policy.KEEP, -900, None, GROUP, pid=8)
    assert (decided.score, decided.ungroup, decided.note_level) == (-900, False, "warning")
    assert decided.note is not None and "will NOT survive" in decided.note


def test_cannot_lower_keeps_the_kernels_reason_and_names_both_ways_out() -> None:
    reason = "cannot lower oom_score_adj of pid 5 from 0 to -1000: ... requires CAP_SYS_RESOURCE"
    message = groupkill.cannot_lower_message(5, GROUP, reason)
    assert message.startswith("postmaster pid=5 will not survive a group kill in ")
    assert reason in message and "--group-kill ungroup" in message


@pytest.mark.parametrize(
    ("score", "group", "expected"),
    [
        (-1000, True, True),
        (-999, True, False),
        (-900, True, False),
        (-900, False, True),
        (-900, None, None),
        (-1000, None, True),
        (None, True, None),
    ],
)
def test_survives_group_kill(
    score: Optional[int], group: Optional[bool], expected: Optional[bool]
) -> None:
    assert survives_group_kill(score, group) is expected


@pytest.mark.parametrize("text", ["auto", "UNGROUP", " keep "])
def test_parse_policy(text: str) -> None:
    assert groupkill.parse_policy(text).value == text.strip().lower()


def test_parse_policy_rejects() -> None:
    with pytest.raises(UsageError, match="use one of auto, ungroup, keep"):
        groupkill.parse_policy("never")


# --- the facts, from fake cgroup v2 trees -----------------------------------------------


def _tree(base: Path, flags: dict[str, str]) -> CgroupView:
    (base / "proc" / "self").mkdir(parents=True)
    (base / "proc" / "self" / "mountinfo").write_text(V2_MOUNTINFO)
    (base / "proc" / "77").mkdir()
    (base / "proc" / "77" / "cgroup").write_text(f"0::{CONTAINER}\n")
    (base / "sys/fs/cgroup" / CONTAINER.lstrip("/")).mkdir(parents=True)
    for path, flag in flags.items():
        (base / "sys/fs/cgroup" / path.lstrip("/") / "memory.oom.group").write_text(flag)
    return CgroupView(ProcFS(str(base / "proc")), fs_root=str(base))


@pytest.mark.parametrize(
    ("flags", "own", "at"),
    [
        ({CONTAINER: "1\n"}, True, CONTAINER),
        ({CONTAINER: "0\n", POD: "0\n"}, False, None),
        ({CONTAINER: "0\n", POD: "1\n"}, False, POD),
        ({CONTAINER: "1\n", POD: "1\n"}, True, POD),
    ],
)
def test_observe_finds_the_highest_flag(
    tmp_path: Path, flags: dict[str, str], own: bool, at: Optional[str]
) -> None:
    view = _tree(tmp_path, flags)
    facts = groupkill.facts_from(view.observe(77))
    assert facts.version == 2 and facts.path == CONTAINER
    assert facts.own_oom_group is own
    assert facts.group_kill_at == (None if at is None else f"/sys/fs/cgroup{at}")


def test_facts_from_a_process_without_a_memory_cgroup() -> None:
    assert groupkill.facts_from(CgroupReport(None, None, None)) == CgroupFacts(None)


def test_facts_from_v1() -> None:
    state = MemoryState(1, 1, "/d", 0, 0, 0, None, 0)
    report = CgroupReport(MemCgroup(1, "/pgtest", "/d"), state, None)
    assert groupkill.kills_as_group(groupkill.facts_from(report)) is False


# --- watcher.policy: the decision applied on fake trees ----------------------------------


def _policy_tree(base: Path, flag: str, environ: bytes = b"") -> GroupKillPolicy:
    view = _tree(base, {CONTAINER: flag})
    (base / "proc" / "77" / "environ").write_bytes(environ)
    del view
    return GroupKillPolicy(ProcFS(str(base / "proc")), Policy.UNGROUP, fs_root=str(base))


def test_apply_ungroup_writes_0_and_reads_it_back(tmp_path: Path) -> None:
    policy = _policy_tree(tmp_path, "1\n")
    applied = policy.apply(77, -900, 0)
    assert applied.ungrouped and not applied.errors
    assert applied.plan.score == -900
    flag = tmp_path / "sys/fs/cgroup" / CONTAINER.lstrip("/") / "memory.oom.group"
    assert flag.read_text().strip() == "0"
    assert groupkill.kills_as_group(applied.facts) is False


def test_apply_ungroup_refused_is_one_error_and_the_score_stays(tmp_path: Path) -> None:
    policy = _policy_tree(tmp_path, "1\n")
    flag = tmp_path / "sys/fs/cgroup" / CONTAINER.lstrip("/") / "memory.oom.group"
    real = tmp_path / "real-flag"
    real.write_text("1\n")
    flag.unlink()
    flag.symlink_to(real)  # O_NOFOLLOW refuses it, as a planted link must be
    applied = policy.apply(77, -900, 0)
    assert not applied.ungrouped
    assert len(applied.errors) == 1
    assert applied.errors[0].startswith("postmaster pid=77: --group-kill ungroup cannot clear")
    assert applied.plan.score == -900
    assert real.read_text() == "1\n"


def test_apply_dry_run_writes_nothing(tmp_path: Path) -> None:
    _tree(tmp_path, {CONTAINER: "1\n"})
    policy = GroupKillPolicy(
        ProcFS(str(tmp_path / "proc")), Policy.UNGROUP, dry_run=True, fs_root=str(tmp_path)
    )
    assert policy.apply(77, -900, None).plan.ungroup
    flag = tmp_path / "sys/fs/cgroup" / CONTAINER.lstrip("/") / "memory.oom.group"
    assert flag.read_text() == "1\n"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (b"PG_OOM_ADJUST_FILE=/proc/self/oom_score_adj\0PG_OOM_ADJUST_VALUE=5\0", 5),
        (b"PG_OOM_ADJUST_FILE=/proc/self/oom_score_adj\0", 0),  # PostgreSQL's default
        (b"PG_OOM_ADJUST_VALUE=5\0", None),  # no file: the children write nothing
        (b"PG_OOM_ADJUST_FILE=x\0PG_OOM_ADJUST_VALUE=99999999999\0", None),
        (b"PG_OOM_ADJUST_FILE=x\0PG_OOM_ADJUST_VALUE=-1000\0", -1000),
    ],
)
def test_exported_children_value(tmp_path: Path, environ: bytes, expected: Optional[int]) -> None:
    policy = _policy_tree(tmp_path, "1\n", environ)
    assert policy.exported_children_value(77) == expected


def test_auto_uses_the_exported_value_but_never_minus_1000(tmp_path: Path) -> None:
    _tree(tmp_path, {CONTAINER: "1\n"})
    env = b"PG_OOM_ADJUST_FILE=x\0PG_OOM_ADJUST_VALUE=-1000\0"
    (tmp_path / "proc" / "77" / "environ").write_bytes(env)
    policy = GroupKillPolicy(ProcFS(str(tmp_path / "proc")), Policy.AUTO, fs_root=str(tmp_path))
    applied = policy.apply(77, -900, None)
    assert (applied.plan.score, applied.plan.children_score) == (-1000, 0)


def test_describe_for_status(tmp_path: Path) -> None:
    view = _tree(tmp_path, {CONTAINER: "1\n"})
    doc = describe(view.observe(77), -900)
    assert doc["cgroup"]["version"] == 2 and doc["cgroup"]["group_kill"] is True
    assert doc["survives_group_kill"] is False
    assert describe(view.observe(77), -1000)["survives_group_kill"] is True
