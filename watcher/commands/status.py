"""`pgoom status`: postgres processes, their roles and scores, and protection."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Optional

from watcher.config import build_rules
from watcher.discover import PATTERN, Finding, discover
from watcher.errors import AccessDenied, ProcessGone
from watcher.match import ProcInfo, Rule, role_of, validate_score
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
    """Every postgres process. Every verified postmaster is listed as one; without
    --pattern each is judged against `score`, with it only those a pattern covers (the
    others say so). The fallbacks (the parent of other postgres processes, else the only
    one) apply without --pattern, as in `pgoom watch`."""
    procfs = procfs or ProcFS()
    validate_score(score)
    every_postmaster = Rule(score=score)
    # Validates the patterns too: one-line error, exit 2.
    rules = build_rules(patterns, [], score, None) if patterns else []
    postmasters = {
        finding.pid: finding
        for finding in discover(procfs, [*rules, every_postmaster], fallback=not patterns)
        if finding.verdict.ok
    }
    infos: list[ProcInfo] = []
    for pid in procfs.pids():
        try:
            stat = procfs.stat(pid)
            argv = procfs.cmdline(pid)
        except (ProcessGone, AccessDenied):
            continue
        info = ProcInfo(pid, stat.ppid, stat.comm, argv)
        if info.is_postgres or pid in postmasters:
            infos.append(info)
    view = CgroupView(procfs)
    rows = []
    for info in sorted(infos, key=lambda i: (i.ppid not in postmasters, i.pid)):
        finding = postmasters.get(info.pid)
        parent = postmasters.get(info.ppid)
        is_pm = finding is not None
        covered = finding is not None and (finding.rule is not every_postmaster or not patterns)
        owner = finding or parent
        data_dir = owner.facts.data_dir if owner is not None else None
        try:
            adj: Optional[int] = procfs.oom_score_adj(info.pid)
            oom: Optional[int] = procfs.oom_score(info.pid)
        except (ProcessGone, AccessDenied):
            adj = oom = None
        try:
            rss = procfs.rss_kib(info.pid)
        except (ProcessGone, AccessDenied):
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
                protected=(adj is not None and adj <= score) if covered else None,
                note=_note(finding, covered),
                cgroup=cgroup.get("cgroup"),
                survives_group_kill=cgroup.get("survives_group_kill"),
                cgroup_text=cgroup.get("cgroup_text", ""),
            )
        )
    return rows


def _note(finding: Optional[Finding], covered: bool) -> str:
    if finding is None:
        return ""
    if not covered:
        return "no --pattern covers it"
    return finding.verdict.reason if finding.method == PATTERN else finding.how


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
