"""`pgoom status`: postgres processes, their roles and scores, and protection."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional

import psutil

from watcher.config import build_rules
from watcher.errors import AccessDenied, ProcessGone
from watcher.identity import inspect
from watcher.match import ProcInfo, confirm, fallback_postmasters, role_of
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
            )
        )
    return rows


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
