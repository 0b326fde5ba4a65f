"""The kernel's own account of an OOM kill, read from /dev/kmsg.

Lines of interest (Linux 5.x/6.x wording):
  oom-kill:constraint=CONSTRAINT_MEMCG,...,oom_memcg=/g,task_memcg=/g,task=postgres,pid=1,uid=26
  Memory cgroup out of memory: Killed process 1 (postgres) total-vm:..., oom_score_adj:1000
and, with vm.oom_dump_tasks=1 (the default), one row per task of the group:
  [  pid  ]   uid  tgid total_vm      rss ... oom_score_adj name
With memory.oom.group=1 (cgroup v2) the first kill is followed by
  Tasks in /g are going to be killed due to memory.oom.group set
and one "Killed process" line per other task of the group not at -1000.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from typing import Optional

# The comm is up to 15 bytes of anything, ")" included: anchor on the field after it.
_KILLED = re.compile(r"Killed process (\d+) \((.*)\) total-vm:.*?oom_score_adj:(-?\d+)")
_CONSTRAINT = re.compile(r"oom-kill:.*?oom_memcg=([^,]*),.*?pid=(\d+)")
_GROUP_KILL = re.compile(r"Tasks in (\S+) are going to be killed due to memory\.oom\.group set")
_TASK_HEADER = re.compile(r"^\[\s*pid\s*\]\s+(.*)$")
_TASK_ROW = re.compile(r"^\[\s*(\d+)\]\s+(.*)$")


@dataclass
class Kill:
    pid: int
    comm: str
    oom_score_adj: int
    line: str


@dataclass
class OomReport:
    """What the kernel logged about OOM kills in one group."""

    kills: list[Kill] = field(default_factory=list)
    # pid -> {"rss": pages, "oom_score_adj": n, "name": comm} from the task dump
    tasks: dict[int, dict[str, object]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


class KernelLog:
    """Reads records appended to the kernel ring buffer since open (or the last read)."""

    def __init__(self) -> None:
        self.fd: Optional[int] = None
        try:
            self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            self.fd = None  # no /dev/kmsg (some containers): the oom_kill counter still works

    @property
    def available(self) -> bool:
        return self.fd is not None

    def read(self) -> list[str]:
        """Messages since the last call (one string per record, continuation lines dropped)."""
        if self.fd is None:
            return []
        out: list[str] = []
        while True:
            try:
                record = os.read(self.fd, 8192)
            except OSError as err:
                if err.errno == errno.EPIPE:
                    continue  # the ring buffer overwrote records we had not read yet
                if err.errno == errno.EAGAIN:
                    break
                raise
            if not record:
                break
            text = record.decode("utf-8", "replace")
            _, _, message = text.partition(";")
            out.append(message.split("\n", 1)[0])
        return out

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def parse(lines: list[str], memcg_path: str, pids: Optional[set[int]] = None) -> OomReport:
    """Keep the kills in `memcg_path` (and, when given, of `pids`) and the task dump rows
    printed just before them."""
    report = OomReport()
    columns: list[str] = []
    pending_tasks: dict[int, dict[str, object]] = {}
    in_group = False
    group_kill = False  # inside a memory.oom.group kill of memcg_path: every line counts
    for line in lines:
        header = _TASK_HEADER.match(line)
        if header:
            columns = header.group(1).split()
            pending_tasks = {}
            group_kill = False
            continue
        row = _TASK_ROW.match(line)
        if row and columns:
            # columns: uid tgid total_vm rss [rss_anon rss_file rss_shmem] pgtables swapents
            # oom_score_adj name -- the name last, and it may contain spaces
            values = row.group(2).split(None, len(columns) - 1)
            if len(values) == len(columns):
                entry = dict(zip(columns, values))
                try:
                    pending_tasks[int(row.group(1))] = {
                        "rss_pages": int(entry.get("rss", 0)),
                        "oom_score_adj": int(entry.get("oom_score_adj", 0)),
                        "name": entry.get("name", ""),
                    }
                except ValueError:
                    pass  # a garbled row: the harness reports without it, never crashes
            continue
        constraint = _CONSTRAINT.search(line)
        if constraint:
            group_kill = False
            in_group = constraint.group(1) == memcg_path
            if in_group:
                if not report.tasks:  # the first OOM's dump: the state that decided
                    report.tasks.update(pending_tasks)
                report.lines.append(line)
            columns = []
            continue
        group = _GROUP_KILL.search(line)
        if group:
            group_kill = in_group = group.group(1) == memcg_path
            if group_kill:
                report.lines.append(line)
            continue
        killed = _KILLED.search(line)
        if killed:
            pid = int(killed.group(1))
            if in_group or (pids is not None and pid in pids):
                report.kills.append(Kill(pid, killed.group(2), int(killed.group(3)), line))
                report.lines.append(line)
            in_group = group_kill
    return report
