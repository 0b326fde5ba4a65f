"""`pgoom status`: postgres processes, their roles and scores, and protection."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional

from watcher.config import build_rules
from watcher.discover import PATTERN, Finding, discover
from watcher.errors import AccessDenied, ProcessGone
from watcher.match import ProcInfo, Rule, role_of, validate_score
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
        return json.dumps([asdict(r) for r in rows], indent=2)
    if not rows:
        return "no postgres processes"
    header = ("PID", "PPID", "ROLE", "DATA DIR", "ADJ", "SCORE", "RSS MiB", "PROTECTED")
    table = [header] + [
        (
            str(r.pid),
            str(r.ppid),
            r.role,
            r.data_dir or "-",
            "-" if r.oom_score_adj is None else str(r.oom_score_adj),
            "-" if r.oom_score is None else str(r.oom_score),
            "-" if r.rss_kib is None else f"{r.rss_kib / 1024:.1f}",
            "" if r.protected is None else ("yes" if r.protected else "NO"),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)
