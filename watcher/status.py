"""`pgoom status`: postgres processes, their roles and scores, and protection."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Optional

import psutil

from watcher.config import build_rules
from watcher.errors import AccessDenied, ProcessGone
from watcher.identity import inspect
from watcher.match import ProcInfo, confirm, fallback_postmasters, role_of
from watcher.memcg import CgroupView
from watcher.policy import describe, mib, short, survives_text
from watcher.procfs import ProcFS


@dataclass(frozen=True)
class Row:
    pid: int
    ppid: int
    role: str
    data_dir: Optional[str]
    oom_score_adj: Optional[int]
    oom_score: Optional[int]
    rss_kib: Optional[int]
    protected: Optional[bool]  # postmasters only: at or below the target score
    note: str = ""
    # postmasters only: the memory cgroup (watcher.policy.describe) and whether its score
    # survives a group kill there (None: unknown, the flag is not visible from here)
    cgroup: Optional[dict[str, Any]] = None
    survives_group_kill: Optional[bool] = None
    cgroup_text: str = ""


def snapshot(patterns: list[str], score: int, procfs: Optional[ProcFS] = None) -> list[Row]:
    procfs = procfs or ProcFS()
    build_rules(patterns, [], score, None)  # validates the options: one-line error, exit 2
    infos: list[ProcInfo] = []
    for pid in procfs.pids():
        try:
            stat = procfs.stat(pid)
            argv = procfs.cmdline(pid)
        except (ProcessGone, AccessDenied):
            continue
        info = ProcInfo(pid, stat.ppid, stat.comm, argv)
        if info.is_postgres:
            infos.append(info)
    postmasters: dict[int, tuple[Optional[str], str]] = {}
    for info in infos:
        try:
            facts = inspect(procfs, info.pid, argv=info.argv)
        except (ProcessGone, AccessDenied):
            continue
        verdict = confirm(facts)
        if verdict.ok:
            postmasters[info.pid] = (facts.data_dir, verdict.reason)
    if not postmasters:
        for info in fallback_postmasters(infos)[0]:
            postmasters[info.pid] = (None, "fallback")
    view = CgroupView(procfs)
    rows = []
    for info in sorted(infos, key=lambda i: (i.ppid not in postmasters, i.pid)):
        is_pm = info.pid in postmasters
        data_dir = postmasters[info.pid][0] if is_pm else None
        if not is_pm and info.ppid in postmasters:
            data_dir = postmasters[info.ppid][0]
        try:
            adj: Optional[int] = procfs.oom_score_adj(info.pid)
            oom: Optional[int] = procfs.oom_score(info.pid)
        except (ProcessGone, AccessDenied):
            adj = oom = None
        try:
            rss: Optional[int] = psutil.Process(info.pid).memory_info().rss // 1024
        except (psutil.Error, OSError):
            rss = None
        cgroup: dict[str, Any] = {}
        if is_pm:
            try:
                report = view.observe(info.pid)
            except (ProcessGone, AccessDenied, OSError):
                report = None
            if report is not None:
                cgroup = describe(report, adj)
                cgroup["cgroup_text"] = short(report)
        rows.append(
            Row(
                pid=info.pid,
                ppid=info.ppid,
                role=role_of(info.argv, is_pm),
                data_dir=data_dir,
                oom_score_adj=adj,
                oom_score=oom,
                rss_kib=rss,
                protected=(adj is not None and adj <= score) if is_pm else None,
                note=postmasters[info.pid][1] if is_pm else "",
                cgroup=cgroup.get("cgroup"),
                survives_group_kill=cgroup.get("survives_group_kill"),
                cgroup_text=cgroup.get("cgroup_text", ""),
            )
        )
    return rows


def render(rows: list[Row], as_json: bool) -> str:
    if as_json:
        docs = [asdict(r) for r in rows]
        for doc in docs:
            doc.pop("cgroup_text")  # the table's shorthand for what "cgroup" says
        return json.dumps(docs, indent=2)
    if not rows:
        return "no postgres processes"
    header = (
        "PID",
        "PPID",
        "ROLE",
        "DATA DIR",
        "ADJ",
        "SCORE",
        "RSS MiB",
        "CGROUP",
        "LIMIT MiB",
        "USAGE MiB",
        "GROUP KILL",
        "PROTECTED",
    )
    table = [header] + [
        (
            str(r.pid),
            str(r.ppid),
            r.role,
            r.data_dir or "-",
            "-" if r.oom_score_adj is None else str(r.oom_score_adj),
            "-" if r.oom_score is None else str(r.oom_score),
            "-" if r.rss_kib is None else f"{r.rss_kib / 1024:.1f}",
            r.cgroup_text,
            "" if r.cgroup is None else mib(r.cgroup["effective_limit_bytes"]),
            "" if r.cgroup is None else mib(r.cgroup["usage_bytes"]),
            "" if r.cgroup is None else _group_kill_text(r),
            "" if r.protected is None else ("yes" if r.protected else "NO"),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def _group_kill_text(row: Row) -> str:
    """'none' where the cgroup does not kill as a group, else whether this score survives."""
    assert row.cgroup is not None
    if row.cgroup["group_kill"] is False:
        return "none"
    return f"survives: {survives_text(row.survives_group_kill)}"
