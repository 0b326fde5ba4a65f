"""The doctor's pure decisions and parsers (the checks' I/O runs in
tests/integration/test_doctor.py)."""

from __future__ import annotations

import json

import pytest

from watcher.commands.doctor.checks import (
    FAIL,
    PASS,
    WARN,
    CheckResult,
    NamespaceFacts,
    PostmasterCgroup,
    decide_cap_dac_override,
    decide_cap_sys_resource,
    decide_kernel,
    decide_namespaces,
    decide_netlink,
    decide_overcommit,
    decide_own_score,
    decide_postmaster_cgroups,
    decide_swap,
    find_floor,
    namespace_verdicts,
    render,
    worst_exit_code,
)
from watcher.limits import CAP_DAC_OVERRIDE, CAP_SYS_RESOURCE
from watcher.parse import kernel_version, parse_meminfo

# CapEff/CapBnd of root on this machine kind: everything but CAP_SYS_RESOURCE (bit 24).
FULL = (1 << 41) - 1
NO_SYS_RESOURCE = FULL & ~(1 << CAP_SYS_RESOURCE)


@pytest.mark.parametrize(
    ("release", "status"),
    [
        ("6.18.44-fc-v782", PASS),
        ("6.6.0", PASS),
        ("6.5.13-generic", WARN),
        ("5.15.0-91-generic", WARN),
        ("garbage", WARN),
    ],
)
def test_kernel(release: str, status: str) -> None:
    result = decide_kernel(release)
    assert result.status == status
    if status != PASS:
        assert result.fix


def test_kernel_version() -> None:
    assert kernel_version("6.10.2-arch1") == (6, 10)
    assert kernel_version("x") is None


def test_netlink() -> None:
    assert decide_netlink(None, True).status == PASS
    failed = decide_netlink("no ack within 0.5 s", False)
    assert failed.status == WARN and "no ack" in failed.detail and "--data-dir" in failed.fix


@pytest.mark.parametrize(
    ("floor", "accepted"),
    [(-1000, -1000), (0, 0), (-997, -997), (900, 900), (1000, 1000), (-999, -999)],
)
def test_find_floor_bisects_like_the_kernel(floor: int, accepted: int) -> None:
    writes: list[int] = []

    def can_set(value: int) -> bool:
        writes.append(value)
        return value >= floor  # the kernel: refuse below oom_score_adj_min

    assert find_floor(can_set) == accepted
    assert len(writes) <= 13  # bisection over 2001 values, not a scan


def test_find_floor_when_nothing_is_accepted() -> None:
    assert find_floor(lambda _v: False) == 1001


def test_cap_sys_resource_missing_and_needed_fails_with_the_fix() -> None:
    result = decide_cap_sys_resource(NO_SYS_RESOURCE, NO_SYS_RESOURCE, -900, 0)
    assert result.status == FAIL
    assert "bounding set" in result.detail and "-900" in result.detail
    assert "--cap-add SYS_RESOURCE" in result.fix and "--score 0" in result.fix


def test_cap_sys_resource_missing_but_not_needed_warns() -> None:
    result = decide_cap_sys_resource(NO_SYS_RESOURCE, NO_SYS_RESOURCE, 0, 0)
    assert result.status == WARN and "reachable" in result.detail


def test_cap_sys_resource_in_bounding_only() -> None:
    result = decide_cap_sys_resource(0, FULL, -900, 0)
    assert result.status == FAIL and "effective set" in result.detail


def test_cap_sys_resource_effective_passes() -> None:
    assert decide_cap_sys_resource(FULL, FULL, -1000, 0).status == PASS


def test_cap_sys_resource_inside_a_user_namespace_does_not_count() -> None:
    """capable() checks the initial user namespace."""
    result = decide_cap_sys_resource(FULL, FULL, -900, 0, initial_user_ns=False)
    assert result.status == FAIL and "user namespace" in result.detail


def test_cap_dac_override() -> None:
    assert decide_cap_dac_override(FULL, 0).status == PASS
    missing = decide_cap_dac_override(FULL & ~(1 << CAP_DAC_OVERRIDE), 26)
    assert missing.status == WARN and "uid 26" in missing.detail


@pytest.mark.parametrize(
    ("floor", "score", "status"),
    [(0, -900, FAIL), (0, 0, PASS), (-1000, -1000, PASS), (-997, -900, PASS), (900, 0, FAIL)],
)
def test_own_score(floor: int, score: int, status: str) -> None:
    result = decide_own_score(1000, floor, score)
    assert result.status == status
    if status == FAIL:
        assert f"--score {floor}" in result.fix


def _ns(**kwargs: object) -> NamespaceFacts:
    initial = {"pid": "pid:[4026531836]", "user": "user:[4026531837]", "net": "net:[4026531840]"}
    base: dict[str, object] = dict(
        own=dict(initial),
        kthreadd=dict(initial),
        pid1=dict(initial),
        uid_map="         0          0 4294967295\n",
        nspid_levels=1,
    )
    base.update(kwargs)
    return NamespaceFacts(**base)  # type: ignore[arg-type]


def test_namespaces_initial() -> None:
    assert decide_namespaces(_ns()).status == PASS


def test_namespaces_container_pid_ns_without_kthreadd() -> None:
    facts = _ns(
        own={"pid": "pid:[1]", "user": "user:[4026531837]", "net": "net:[2]"},
        kthreadd=None,
        pid1={"pid": "pid:[1]", "user": "user:[4026531837]", "net": "net:[2]"},
        nspid_levels=1,
    )
    verdicts = namespace_verdicts(facts)
    assert verdicts["pid"] is False and verdicts["user"] is True and verdicts["net"] is None
    result = decide_namespaces(facts)
    assert result.status == WARN and "pid" in result.detail and "inotify" in result.fix


def test_namespaces_other_net_ns() -> None:
    facts = _ns(own={"pid": "pid:[4026531836]", "user": "user:[4026531837]", "net": "net:[9]"})
    verdicts = namespace_verdicts(facts)
    assert verdicts == {"pid": True, "user": True, "net": False}
    assert "network" in decide_namespaces(facts).detail


def test_namespaces_unprivileged_uses_uid_map_and_netlink_ack() -> None:
    unreadable = {"pid": None, "user": None, "net": None}
    facts = _ns(kthreadd=dict(unreadable), pid1=dict(unreadable))
    assert namespace_verdicts(facts) == {"pid": True, "user": True, "net": None}
    acked = _ns(kthreadd=dict(unreadable), pid1=dict(unreadable), netlink_acked=True)
    assert decide_namespaces(acked).status == PASS


def test_namespaces_user_ns_by_uid_map() -> None:
    unreadable = {"pid": None, "user": None, "net": None}
    facts = _ns(kthreadd=dict(unreadable), pid1=dict(unreadable), uid_map="0 1000 1\n")
    assert namespace_verdicts(facts)["user"] is False


def test_namespaces_pid_ns_seen_through_host_proc() -> None:
    """unshare --pid without --mount-proc: kthreadd is visible, NSpid has two levels."""
    unreadable = {"pid": None, "user": None, "net": None}
    facts = _ns(kthreadd=dict(unreadable), pid1=dict(unreadable), nspid_levels=2)
    assert namespace_verdicts(facts)["pid"] is False


def _pm(group: object, adj: int, writable: bool = False, version: int = 2) -> PostmasterCgroup:
    cgroup = {
        "version": version,
        "path": "/kubepods.slice/pod/ctr",
        "group_kill": group,
        "group_kill_at": "/sys/fs/cgroup/kubepods.slice/pod/ctr" if group else None,
    }
    survives = True if adj == -1000 or group is False else (None if group is None else False)
    return PostmasterCgroup(42, adj, cgroup, survives, writable)


def test_postmaster_cgroups_none_running() -> None:
    assert decide_postmaster_cgroups([], True).status == PASS


def test_postmaster_cgroups_v1_and_no_group_kill_pass() -> None:
    result = decide_postmaster_cgroups([_pm(False, -900, version=1)], False)
    assert result.status == PASS and "cgroup v1" in result.detail
    assert decide_postmaster_cgroups([_pm(False, -900)], False).status == PASS


def test_postmaster_cgroups_group_kill_at_minus_900_fails_with_what_can_fix_it() -> None:
    result = decide_postmaster_cgroups([_pm(True, -900)], True)
    assert result.status == FAIL
    assert "pid 42" in result.detail and "dies in a group kill" in result.detail
    assert "--group-kill auto can set -1000" in result.detail
    assert "--group-kill" in result.fix
    none = decide_postmaster_cgroups([_pm(True, -900)], False)
    assert "neither -1000" in none.detail
    assert "ungroup can write" in decide_postmaster_cgroups([_pm(True, -900, True)], False).detail


def test_postmaster_cgroups_minus_1000_survives() -> None:
    result = decide_postmaster_cgroups([_pm(True, -1000)], True)
    assert result.status == PASS and "-1000 survives" in result.detail


def test_postmaster_cgroups_not_visible_warns() -> None:
    result = decide_postmaster_cgroups([_pm(None, -900)], True)
    assert result.status == WARN and "not visible" in result.detail


MEMINFO_NO_SWAP = (
    "MemTotal:       24683656 kB\nSwapTotal:             0 kB\nCommitLimit:    12341828 kB\n"
)
MEMINFO_SWAP = (
    "MemTotal:       8000000 kB\nSwapTotal:       8000000 kB\nCommitLimit:    12000000 kB\n"
)


def test_meminfo_and_swap() -> None:
    info = parse_meminfo(MEMINFO_NO_SWAP + "HugePages_Total:       0\nbad line\n")
    assert info["MemTotal"] == 24683656 and info["HugePages_Total"] == 0
    assert decide_swap(info, 0).status == PASS
    low = decide_swap(info, 2)  # strict overcommit with 50 % of RAM committable
    assert low.status == WARN and "overcommit_ratio" in low.fix
    assert decide_swap(parse_meminfo(MEMINFO_SWAP), 2).status == PASS


def test_overcommit() -> None:
    assert decide_overcommit(2, 90).status == PASS
    heuristic = decide_overcommit(0, 50)
    assert heuristic.status == WARN and "vm.overcommit_memory=2" in heuristic.fix
    assert decide_overcommit(1, 50).status == WARN


def test_exit_code_and_render() -> None:
    results = [
        CheckResult("a", PASS, "fine"),
        CheckResult("b", WARN, "meh", "do this"),
    ]
    assert worst_exit_code(results) == 0  # warnings do not fail the doctor
    text = render(results, as_json=False)
    assert "WARN  b" in text and "fix: do this" in text and "exit 0" in text
    results.append(CheckResult("c", FAIL, "broken", "fix that"))
    assert worst_exit_code(results) == 1
    parsed = json.loads(render(results, as_json=True))
    assert parsed["status"] == "fail" and parsed["exit_code"] == 1
    assert parsed["counts"] == {"pass": 1, "warn": 1, "fail": 1}
    assert parsed["checks"][2] == {
        "name": "c",
        "status": "fail",
        "detail": "broken",
        "fix": "fix that",
    }
