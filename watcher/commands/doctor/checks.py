"""`pgoom doctor`'s decisions: pure functions from the facts gathered (watcher.commands.doctor)
to pass, warn or fail, each with the fix worded; and the report."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Optional

from watcher.limits import (
    CAP_DAC_OVERRIDE,
    CAP_SYS_RESOURCE,
    EXIT_CHECK_FAILED,
    EXIT_OK,
    OOM_SCORE_ADJ_MAX,
    OOM_SCORE_ADJ_MIN,
    PROC_INPUT_KERNEL,
)
from watcher.parse import (
    has_capability,
    kernel_version,
)

PASS, WARN, FAIL = "pass", "warn", "fail"
_RANK = {PASS: 0, WARN: 1, FAIL: 2}
INIT_USER_NS_UID_MAP = ("0", "0", "4294967295")  # the identity map only init_user_ns has

CAP_FIX = (
    "grant pgoom CAP_SYS_RESOURCE: docker run --cap-add SYS_RESOURCE, Kubernetes "
    "securityContext.capabilities.add: [SYS_RESOURCE], systemd AmbientCapabilities="
    "CAP_SYS_RESOURCE"
)


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # pass | warn | fail
    detail: str
    fix: str = ""


# --- pure decisions -----------------------------------------------------------------------


def decide_kernel(release: str) -> CheckResult:
    version = kernel_version(release)
    if version is None:
        return CheckResult(
            "kernel",
            WARN,
            f"cannot parse kernel release {release!r}",
            "check `uname -r`; pgoom expects Linux 6.6 or later",
        )
    if version >= PROC_INPUT_KERNEL:
        return CheckResult(
            "kernel",
            PASS,
            f"Linux {release}: the proc connector filters events (proc_input, 6.6+) and "
            "needs no CAP_NET_ADMIN",
        )
    return CheckResult(
        "kernel",
        WARN,
        f"Linux {release} is older than 6.6: the proc connector delivers every fork/exec/exit "
        "unfiltered (more CPU) and subscribing needs CAP_NET_ADMIN",
        "upgrade the kernel to 6.6 or later, or run with CAP_NET_ADMIN, or use "
        "--source inotify --data-dir <dir>",
    )


def decide_netlink(error: Optional[str], filtered: bool) -> CheckResult:
    if error is None:
        how = "filtered to exec events" if filtered else "unfiltered"
        return CheckResult(
            "netlink", PASS, f"proc connector subscribed and acknowledged here ({how})"
        )
    return CheckResult(
        "netlink",
        WARN,
        f"proc connector unusable here: {error}; pgoom falls back to inotify (with "
        "--data-dir) or polling",
        "for exec events run pgoom in the host's pid, user and network namespaces (Kubernetes "
        "hostPID + hostNetwork, docker --pid host --network host); otherwise pass --data-dir so "
        "the inotify source is used",
    )


def decide_inotify(error: Optional[str]) -> CheckResult:
    if error is None:
        return CheckResult("inotify", PASS, "inotify works (the source for --data-dir)")
    return CheckResult(
        "inotify",
        WARN,
        f"inotify unusable: {error}; without netlink pgoom would poll",
        "raise fs.inotify.max_user_instances / max_user_watches (sysctl), or close other "
        "inotify users",
    )


@dataclass(frozen=True)
class NamespaceFacts:
    """What was read to place this process in (or outside) the initial namespaces."""

    own: dict[str, Optional[str]]  # ns name -> link of /proc/self/ns/<name>
    kthreadd: Optional[dict[str, Optional[str]]]  # pid 2's links if pid 2 is kthreadd
    pid1: dict[str, Optional[str]]  # /proc/1/ns/<name> links (None: unreadable)
    uid_map: Optional[str]  # /proc/self/uid_map
    nspid_levels: int  # entries on the NSpid line of /proc/self/status
    netlink_acked: bool = False  # the proc connector acked: only the initial ns get acks


def namespace_verdicts(facts: NamespaceFacts) -> dict[str, Optional[bool]]:
    """For pid, user and net: True (initial), False (not), None (cannot tell).

    Kernel threads live in the initial namespaces (init_nsproxy, init_user_ns), so pid 2
    (kthreadd) is the reference where its links can be read; a /proc that shows no kthreadd
    belongs to a child PID namespace. Without that reference: the user namespace is judged
    by uid_map (only init_user_ns maps the whole 0..4294967294 range onto itself), the PID
    namespace by the NSpid line (one level when /proc/self lives in the namespace of this
    /proc mount and that namespace shows kthreadd), the network namespace by pid 1's link.
    An acknowledged proc connector subscription settles all three: the kernel acks only
    from the initial pid and user namespaces, and refuses sends from another network one.
    """
    verdicts: dict[str, Optional[bool]] = {}
    for name in ("pid", "user", "net"):
        own = facts.own.get(name)
        ref = facts.kthreadd.get(name) if facts.kthreadd is not None else None
        if own is not None and ref is not None:
            verdicts[name] = own == ref
            continue
        if facts.netlink_acked:
            verdicts[name] = True
            continue
        if name == "user" and facts.uid_map is not None:
            verdicts[name] = tuple(facts.uid_map.split()[:3]) == INIT_USER_NS_UID_MAP
        elif name == "pid":
            verdicts[name] = facts.kthreadd is not None and facts.nspid_levels <= 1
        elif own is not None and facts.pid1.get(name) is not None and facts.kthreadd is not None:
            verdicts[name] = own == facts.pid1[name]
        else:
            verdicts[name] = None
    return verdicts


def decide_namespaces(facts: NamespaceFacts) -> CheckResult:
    verdicts = namespace_verdicts(facts)
    outside = [n for n, v in verdicts.items() if v is False]
    unknown = [n for n, v in verdicts.items() if v is None]
    if facts.kthreadd is not None and all(facts.kthreadd.values()):
        how = "compared with kthreadd, pid 2"
    elif facts.netlink_acked:
        how = "the proc connector acknowledged"
    else:
        how = "by uid_map, NSpid and pid 1"
    if not outside and not unknown:
        return CheckResult(
            "namespaces", PASS, f"in the initial pid, user and network namespaces ({how})"
        )
    parts = []
    if outside:
        parts.append(f"not in the initial {', '.join(outside)} namespace(s)")
    if unknown:
        parts.append(f"cannot tell for {', '.join(unknown)}")
    consequence = (
        "the proc connector ignores subscriptions from a non-initial pid or user namespace"
        if {"pid", "user"} & set(outside)
        else "the proc connector refuses sends from a non-initial network namespace"
        if outside
        else "netlink may be unusable"
    )
    return CheckResult(
        "namespaces",
        WARN,
        f"{'; '.join(parts)} ({how}): {consequence}",
        "run pgoom on the host (Kubernetes hostPID + hostNetwork, docker --pid host --network "
        "host) for netlink, or give --data-dir and let it use inotify, which works in any "
        "namespace",
    )


def find_floor(can_set: Callable[[int], bool]) -> int:
    """The lowest oom_score_adj the kernel accepts, by bisection over -1000..1000.

    The kernel refuses a value below the target's oom_score_adj_min unless the writer has
    CAP_SYS_RESOURCE, and accepts everything at or above it: acceptance is monotonic.
    """
    if can_set(OOM_SCORE_ADJ_MIN):
        return OOM_SCORE_ADJ_MIN
    low, high = OOM_SCORE_ADJ_MIN, OOM_SCORE_ADJ_MAX  # low refused, high accepted
    if not can_set(high):
        return OOM_SCORE_ADJ_MAX + 1  # nothing accepted: report as out of range
    while high - low > 1:
        middle = (low + high) // 2
        if can_set(middle):
            high = middle
        else:
            low = middle
    return high


def decide_cap_sys_resource(
    effective: int, bounding: int, score: int, floor: int, initial_user_ns: Optional[bool] = True
) -> CheckResult:
    """The kernel asks capable(CAP_SYS_RESOURCE), i.e. in the *initial* user namespace: a
    capability held inside another user namespace does not lift the floor."""
    if has_capability(effective, CAP_SYS_RESOURCE) and initial_user_ns is not False:
        return CheckResult(
            "cap_sys_resource",
            PASS,
            "CAP_SYS_RESOURCE is effective: pgoom can set any oom_score_adj down to -1000",
        )
    if has_capability(effective, CAP_SYS_RESOURCE):
        where = "the initial user namespace (it is held only inside a child user namespace)"
    elif has_capability(bounding, CAP_SYS_RESOURCE):
        where = "the effective set (the bounding set allows it)"
    else:
        where = "the bounding set"
    needed = score < floor
    detail = (
        f"CAP_SYS_RESOURCE is missing from {where}: without it the kernel refuses any value "
        f"below a process's floor (oom_score_adj_min, {floor} here)"
    )
    if needed:
        return CheckResult(
            "cap_sys_resource",
            FAIL,
            f"{detail}, so --score {score} is out of reach (EACCES)",
            f"{CAP_FIX}; or choose --score {floor} or higher",
        )
    return CheckResult(
        "cap_sys_resource",
        WARN,
        f"{detail}; --score {score} is reachable, values below {floor} are not",
        f"to go lower (-900, -1000): {CAP_FIX}",
    )


def decide_cap_dac_override(effective: int, euid: int) -> CheckResult:
    if has_capability(effective, CAP_DAC_OVERRIDE):
        return CheckResult(
            "cap_dac_override",
            PASS,
            "CAP_DAC_OVERRIDE is effective: pgoom can write oom_score_adj of processes of any user",
        )
    return CheckResult(
        "cap_dac_override",
        WARN,
        f"CAP_DAC_OVERRIDE is missing: /proc/<pid>/oom_score_adj is writable by its owner "
        f"only, so pgoom (uid {euid}) can adjust processes of uid {euid} only",
        "run pgoom as the PostgreSQL user (uid 26 in the Percona image), or as root with "
        "DAC_OVERRIDE (docker and Kubernetes grant it to root by default)",
    )


def decide_own_score(own: int, floor: int, score: int) -> CheckResult:
    """`floor` is what the probe found: the lowest value a write by pgoom was accepted at,
    which already accounts for CAP_SYS_RESOURCE (with it, -1000)."""
    if floor <= OOM_SCORE_ADJ_MIN:
        return CheckResult(
            "oom_score_adj",
            PASS,
            f"pgoom runs at oom_score_adj {own}; its writes were accepted down to -1000 (no "
            f"floor in effect), --score {score} is reachable",
        )
    floor_text = str(floor) if floor <= OOM_SCORE_ADJ_MAX else "above 1000 (every write refused)"
    detail = (
        f"pgoom runs at oom_score_adj {own}, floor {floor_text} (oom_score_adj_min, probed on a "
        "child of pgoom: processes inherit it at fork, so a postmaster started under the "
        "same runtime shares it)"
    )
    if score >= floor:
        return CheckResult("oom_score_adj", PASS, f"{detail}: --score {score} is reachable")
    return CheckResult(
        "oom_score_adj",
        FAIL,
        f"{detail}: --score {score} is below the floor and the kernel refuses it",
        f"choose --score {floor} or higher, or {CAP_FIX}, or start PostgreSQL from a parent "
        "with a lower floor (a Guaranteed Kubernetes pod gets -997)",
    )


@dataclass(frozen=True)
class PostmasterCgroup:
    """What the group-kill check knows of one running postmaster (gathered by
    _check_postmaster_cgroups through watcher.memcg, decided here)."""

    pid: int
    oom_score_adj: Optional[int]
    cgroup: dict[str, Any]  # watcher.policy.describe()["cgroup"]
    survives: Optional[bool]  # watcher.groupkill.survives_group_kill
    oom_group_writable: bool  # its memory.oom.group can be written from here (ungroup)


def decide_postmaster_cgroups(found: list[PostmasterCgroup], can_lower_to_min: bool) -> CheckResult:
    """The postmasters' memory cgroups, not the doctor's own: does each survive a group
    kill at the score it has now, and can pgoom's policies make it survive?"""
    name = "memory.oom.group"
    if not found:
        return CheckResult(
            name, PASS, "no postmaster running: nothing to check (run doctor again once one is)"
        )
    parts: list[str] = []
    status = PASS
    fixes: list[str] = []
    for item in found:
        cg = item.cgroup
        where = cg.get("group_kill_at") or cg.get("path") or "no memory cgroup"
        version = cg.get("version")
        score = "?" if item.oom_score_adj is None else str(item.oom_score_adj)
        head = f"postmaster pid {item.pid} at {score}, cgroup v{version} {cg.get('path')}"
        if cg.get("group_kill") is False:
            detail = "no group kill (cgroup v1)" if version == 1 else "no group kill"
            parts.append(f"{head}: {detail}")
            continue
        if item.survives:
            parts.append(f"{head}: kills as a group ({where}), -1000 survives it")
            continue
        can = []
        if can_lower_to_min:
            can.append("--group-kill auto can set -1000 (CAP_SYS_RESOURCE present)")
        if item.oom_group_writable:
            can.append("--group-kill ungroup can write memory.oom.group=0 here")
        if not can:
            can.append(
                "neither -1000 (no CAP_SYS_RESOURCE) nor memory.oom.group=0 (not writable "
                "from here) is possible from here"
            )
        if cg.get("group_kill") is None:
            parts.append(
                f"{head}: memory.oom.group not visible from here (kubelet 1.28+ sets it to 1 "
                f"on cgroup v2); if it is 1 the postmaster dies in a group kill; {'; '.join(can)}"
            )
            status = WARN if status == PASS else status
        else:
            parts.append(
                f"{head}: memory.oom.group=1 in {where}: it dies in a group kill (only -1000 "
                f"survives); {'; '.join(can)}"
            )
            status = FAIL
        fixes.append(
            "run pgoom watch with --group-kill auto (default; needs CAP_SYS_RESOURCE) or "
            "ungroup (needs the host's cgroupfs writable), or set singleProcessOOMKill: true "
            "in the kubelet configuration (1.32+)"
        )
    return CheckResult(name, status, "; ".join(parts), fixes[0] if fixes else "")


def decide_overcommit(mode: int, ratio: Optional[int]) -> CheckResult:
    if mode == 2:
        return CheckResult(
            "vm.overcommit_memory",
            PASS,
            f"vm.overcommit_memory=2 (ratio {ratio}): allocations fail instead of the host OOM "
            "killer firing, as the PostgreSQL docs recommend",
        )
    what = "always overcommit" if mode == 1 else "heuristic overcommit"
    return CheckResult(
        "vm.overcommit_memory",
        WARN,
        f"vm.overcommit_memory={mode} ({what}): the host can run out of memory and call the "
        "OOM killer; protecting the postmaster is the defence",
        "on a dedicated database host: sysctl -w vm.overcommit_memory=2 (persist it in "
        "/etc/sysctl.d/) with vm.overcommit_ratio high enough for PostgreSQL (about 90 without "
        "swap); a container's memory limit is enforced by the OOM killer whatever this setting",
    )


def decide_swap(meminfo: dict[str, int], overcommit_mode: Optional[int]) -> CheckResult:
    swap_kb = meminfo.get("SwapTotal", 0)
    total_kb = meminfo.get("MemTotal", 0)
    limit_kb = meminfo.get("CommitLimit", 0)
    swap_text = f"{swap_kb // 1024} MiB of swap" if swap_kb else "no swap"
    if overcommit_mode == 2 and total_kb and limit_kb < total_kb * 3 // 4:
        return CheckResult(
            "swap",
            WARN,
            f"{swap_text}; with vm.overcommit_memory=2 only {limit_kb // 1024} MiB may be "
            f"committed ({100 * limit_kb // total_kb}% of {total_kb // 1024} MiB RAM): "
            "PostgreSQL will see allocation failures early",
            "raise vm.overcommit_ratio (e.g. 80-90 without swap) or add swap",
        )
    if not swap_kb:
        return CheckResult(
            "swap",
            PASS,
            "no swap: memory pressure goes straight to the OOM killer, which is what pgoom "
            "guards against",
        )
    return CheckResult("swap", PASS, f"{swap_text}; CommitLimit {limit_kb // 1024} MiB")


# --- output -------------------------------------------------------------------------------


def worst_exit_code(results: list[CheckResult]) -> int:
    """0 when no check failed (warnings do not fail the doctor), else 1."""
    return EXIT_CHECK_FAILED if any(r.status == FAIL for r in results) else EXIT_OK


def worst_status(results: list[CheckResult]) -> str:
    return max((r.status for r in results), key=_RANK.__getitem__, default=PASS)


def render(results: list[CheckResult], as_json: bool) -> str:
    code = worst_exit_code(results)
    counts = {s: sum(r.status == s for r in results) for s in (PASS, WARN, FAIL)}
    if as_json:
        return json.dumps(
            {
                "status": worst_status(results),
                "exit_code": code,
                "counts": counts,
                "checks": [asdict(r) for r in results],
            },
            indent=2,
        )
    width = max((len(r.name) for r in results), default=0)
    lines = []
    for result in results:
        lines.append(f"{result.status.upper():<5} {result.name:<{width}}  {result.detail}")
        if result.fix and result.status != PASS:
            lines.append(f"{'':<5} {'':<{width}}  fix: {result.fix}")
    lines.append(
        f"{counts[FAIL]} failed, {counts[WARN]} warning(s), {counts[PASS]} passed: exit {code}"
    )
    return "\n".join(lines)
