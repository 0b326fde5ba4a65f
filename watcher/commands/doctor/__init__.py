"""`pgoom doctor`: can pgoom protect a postmaster here, and if not, what must change.

Each check gathers a few facts (the only I/O, here), then a pure function in
watcher.commands.doctor.checks decides pass, warn or fail and words the fix. Exit status
(docs/doctor.md): 0 when nothing failed (warnings included: they name a degraded but
working setup), 1 (EXIT_CHECK_FAILED) when a check failed: pgoom cannot reach the target
score, or cannot learn of postmasters at all.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cached_property
from typing import Optional

from loguru import logger

from watcher.commands.doctor.checks import (
    WARN,
    CheckResult,
    NamespaceFacts,
    PostmasterCgroup,
    decide_cap_dac_override,
    decide_cap_sys_resource,
    decide_inotify,
    decide_kernel,
    decide_namespaces,
    decide_netlink,
    decide_overcommit,
    decide_own_score,
    decide_postmaster_cgroups,
    decide_swap,
    find_floor,
    namespace_verdicts,
)
from watcher.errors import AccessDenied, PgoomError, ProcessGone
from watcher.limits import CAP_SYS_RESOURCE, OOM_SCORE_ADJ_MIN
from watcher.match import validate_score
from watcher.memcg import CgroupView
from watcher.parse import (
    capability_set,
    has_capability,
    parse_meminfo,
    parse_stat,
    status_uids,
)
from watcher.procfs import ProcFS

# --- gathering --------------------------------------------------------------------------


def _system_text(procfs: ProcFS, name: str) -> Optional[str]:
    try:
        return procfs.read_system(name)
    except (ProcessGone, AccessDenied, OSError):
        return None


def _ns_links(procfs: ProcFS, pid: int) -> dict[str, Optional[str]]:
    links: dict[str, Optional[str]] = {}
    for name in ("pid", "user", "net"):
        try:
            links[name] = procfs.readlink(pid, f"ns/{name}")
        except (ProcessGone, AccessDenied, OSError):
            links[name] = None
    return links


def gather_namespaces(procfs: ProcFS, netlink_acked: bool = False) -> NamespaceFacts:
    kthreadd: Optional[dict[str, Optional[str]]] = None
    try:
        stat = parse_stat(procfs.read_text(2, "stat"))
        if stat.comm == "kthreadd" and stat.ppid == 0:
            kthreadd = _ns_links(procfs, 2)
    except (ProcessGone, AccessDenied, OSError, ValueError):
        kthreadd = None
    me = os.getpid()
    try:
        uid_map: Optional[str] = procfs.read_text(me, "uid_map")
    except (ProcessGone, AccessDenied, OSError):
        uid_map = None
    try:
        nspid = len(procfs.status(me).get("NSpid", "x").split())
    except (ProcessGone, AccessDenied, OSError):
        nspid = 1
    return NamespaceFacts(
        own=_ns_links(procfs, me),
        kthreadd=kthreadd,
        pid1=_ns_links(procfs, 1),
        uid_map=uid_map,
        nspid_levels=nspid,
        netlink_acked=netlink_acked,
    )


def probe_floor(procfs: ProcFS) -> int:
    """Find the oom_score_adj floor by writing to a child of ours, never to ourselves: the
    child inherits our oom_score_adj and oom_score_adj_min at fork, and a write that works
    on it would work on any process that shares them. The child waits on a pipe and exits
    when it closes (also if we die)."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.close(write_end)
            os.read(read_end, 1)
        finally:
            os._exit(0)
    os.close(read_end)
    try:

        def can_set(value: int) -> bool:
            try:
                procfs.write_oom_score_adj(child, value)
            except AccessDenied:
                return False
            return True

        return find_floor(can_set)
    finally:
        os.close(write_end)
        os.waitpid(child, 0)


def _check_netlink() -> tuple[CheckResult, bool]:
    """Subscribe for real (watcher.sources.netlink requires the ack) and unsubscribe:
    (the verdict, whether the kernel acknowledged)."""
    from watcher.sources.netlink import NetlinkSource

    # A small buffer: this subscription lives for a moment and reads nothing.
    source = NetlinkSource(rcvbuf_bytes=1 << 20, ack_timeout_s=0.5)
    try:
        source.open()
    except PgoomError as err:
        return decide_netlink(str(err), False), False
    finally:
        source.close()
    return decide_netlink(None, source.filtered), True


def _check_inotify() -> CheckResult:
    from watcher.sources.inotify import inotify_init

    try:
        fd = inotify_init()
    except PgoomError as err:
        return decide_inotify(str(err))
    os.close(fd)
    return decide_inotify(None)


def _check_postmaster_cgroups(procfs: ProcFS, effective: int) -> CheckResult:
    """Each running postmaster's memory cgroup as this process sees it (watcher.memcg), not
    the doctor's own: the doctor may run anywhere, the postmaster's cgroup decides."""
    from watcher.commands.verify import find_postmasters
    from watcher.config import build_rules
    from watcher.policy import describe

    view = CgroupView(procfs)
    found = []
    for pm in find_postmasters(procfs, build_rules([], [], OOM_SCORE_ADJ_MIN, None), 0):
        try:
            report = view.observe(pm.pid)
        except (PgoomError, OSError):
            continue
        doc = describe(report, pm.oom_score_adj)
        cgroup = report.cgroup
        writable = (
            cgroup is not None
            and cgroup.version == 2
            and cgroup.directory is not None
            and os.access(f"{cgroup.directory}/memory.oom.group", os.W_OK)
        )
        found.append(
            PostmasterCgroup(
                pm.pid, pm.oom_score_adj, doc["cgroup"], doc["survives_group_kill"], writable
            )
        )
    return decide_postmaster_cgroups(found, has_capability(effective, CAP_SYS_RESOURCE))


class _Host:
    """What several checks share, each gathered once on first use: no check depends on
    another having run first."""

    def __init__(self, procfs: ProcFS) -> None:
        self.procfs = procfs
        status = procfs.status(os.getpid())
        self.effective = capability_set(status, "CapEff")
        self.bounding = capability_set(status, "CapBnd")
        self.euid = status_uids(status)[1]

    @cached_property
    def netlink(self) -> tuple[CheckResult, bool]:
        return _check_netlink()

    @cached_property
    def namespaces(self) -> NamespaceFacts:
        # Only the initial namespaces get the proc connector's ack: evidence for that check.
        return gather_namespaces(self.procfs, netlink_acked=self.netlink[1])

    @cached_property
    def floor(self) -> int:
        return probe_floor(self.procfs)

    @cached_property
    def overcommit_mode(self) -> Optional[int]:
        text = _system_text(self.procfs, "sys/vm/overcommit_memory")
        return int(text) if text is not None and text.strip().isdigit() else None

    def overcommit(self) -> CheckResult:
        mode = self.overcommit_mode
        if mode is None:
            return CheckResult(
                "vm.overcommit_memory", WARN, "cannot read /proc/sys/vm/overcommit_memory"
            )
        ratio_text = _system_text(self.procfs, "sys/vm/overcommit_ratio")
        ratio = int(ratio_text) if ratio_text and ratio_text.strip().isdigit() else None
        return decide_overcommit(mode, ratio)

    def swap(self) -> CheckResult:
        meminfo = parse_meminfo(_system_text(self.procfs, "meminfo") or "")
        return decide_swap(meminfo, self.overcommit_mode)


def run_checks(score: int, proc_root: str = "/proc") -> list[CheckResult]:
    """Run every check against target `score`. Raises UsageError for a score out of range."""
    validate_score(score)
    procfs = ProcFS(proc_root)
    host = _Host(procfs)
    me = os.getpid()
    checks: list[tuple[str, Callable[[], CheckResult]]] = [
        ("kernel", lambda: decide_kernel(os.uname().release)),
        ("netlink", lambda: host.netlink[0]),
        ("inotify", _check_inotify),
        ("namespaces", lambda: decide_namespaces(host.namespaces)),
        (
            "cap_sys_resource",
            lambda: decide_cap_sys_resource(
                host.effective,
                host.bounding,
                score,
                host.floor,
                namespace_verdicts(host.namespaces)["user"],
            ),
        ),
        ("cap_dac_override", lambda: decide_cap_dac_override(host.effective, host.euid)),
        ("oom_score_adj", lambda: decide_own_score(procfs.oom_score_adj(me), host.floor, score)),
        ("memory.oom.group", lambda: _check_postmaster_cgroups(procfs, host.effective)),
        ("vm.overcommit_memory", host.overcommit),
        ("swap", host.swap),
    ]
    results = []
    # The sources log at debug level while they open; the doctor's output is its report.
    logger.disable("watcher")
    try:
        for name, check in checks:
            try:
                results.append(check())
            except (PgoomError, OSError, ValueError, KeyError) as err:
                # One check that cannot run must not hide the others.
                reason = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else err
                results.append(
                    CheckResult(
                        name,
                        WARN,
                        f"could not check: {reason}",
                        "run pgoom doctor as the user and in the container pgoom runs in",
                    )
                )
    finally:
        logger.enable("watcher")
    return results
