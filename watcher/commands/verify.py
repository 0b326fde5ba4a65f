"""`pgoom verify`: is every postmaster protected? For CI jobs and Kubernetes probes.

Finds postmasters as the watcher does (watcher.discover, with the watcher's own rules; the
fallbacks, the parent of other postgres processes, else the only one, apply with the
default pattern only, when it matches nothing) and polls
until every one is at or below the expected score, or the timeout passes. Read-only: it
never writes a score.

Exit codes (watcher/errors.py):
  0  every postmaster found is at or below --score
  1  EXIT_CHECK_FAILED: a postmaster was still above --score when the timeout passed
  2  EXIT_USAGE: a bad option (score out of range, invalid pattern, negative timeout)
  3  EXIT_NOT_FOUND: no postmaster was found before the timeout passed
  7  EXIT_GROUP_KILL: every postmaster is at or below --score, but one would still die in a
     group kill (its memory cgroup has memory.oom.group=1 and it is above -1000)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

from watcher.config import build_rules, check_data_dir
from watcher.discover import discover
from watcher.errors import AccessDenied, ProcessGone
from watcher.limits import EXIT_CHECK_FAILED, EXIT_GROUP_KILL, EXIT_NOT_FOUND, EXIT_OK
from watcher.match import Rule
from watcher.memcg import CgroupView
from watcher.options import VERIFY_TIMEOUT
from watcher.policy import describe
from watcher.procfs import ProcFS

# Short enough that a probe with a 1 s timeout still gets several looks; long enough that a
# 10 s wait costs a hundred /proc scans, not thousands.
POLL_INTERVAL_S = 0.1


@dataclass(frozen=True)
class Found:
    pid: int
    data_dir: Optional[str]
    oom_score_adj: Optional[int]  # None: the process exited between the scan and the read
    protected: bool
    how: str  # the rule that named it, or the fallback method
    reason: str  # why confirm() accepted it
    # Its memory cgroup (watcher.policy.describe) and whether its score survives a group
    # kill there: False is "at its score and still dies", what exit code 7 reports.
    cgroup: Optional[dict[str, Any]] = None
    survives_group_kill: Optional[bool] = None

    @property
    def ok(self) -> bool:
        return self.protected and self.survives_group_kill is not False


def find_postmasters(
    procfs: ProcFS, rules: list[Rule], score: int, fallback: bool = True
) -> list[Found]:
    """One scan of /proc, deciding as `pgoom watch` does, and reading each score."""
    found: list[Found] = []
    for finding in discover(procfs, rules, fallback):
        if not finding.protectable:
            continue  # e.g. named postgres, but not in the --data-dir the rule asks for
        try:
            adj: Optional[int] = procfs.oom_score_adj(finding.pid)
        except (ProcessGone, AccessDenied):
            adj = None
        try:
            cgroup = describe(CgroupView(procfs).observe(finding.pid), adj)
        except (ProcessGone, AccessDenied, OSError):
            cgroup = {}
        found.append(
            Found(
                pid=finding.pid,
                data_dir=finding.facts.data_dir,
                oom_score_adj=adj,
                protected=adj is not None and adj <= score,
                how=finding.how,
                reason=finding.verdict.reason,
                cgroup=cgroup.get("cgroup"),
                survives_group_kill=cgroup.get("survives_group_kill"),
            )
        )
    return found


def verify_postmasters(
    patterns: list[str],
    data_dirs: list[str],
    score: int,
    timeout_s: float,
    as_json: bool,
    procfs: Optional[ProcFS] = None,
    poll_interval_s: float = POLL_INTERVAL_S,
) -> tuple[int, str]:
    """Poll until every postmaster found is at or below `score`; return (exit code, text).

    A timeout of 0 looks exactly once. Success needs at least one postmaster: a probe that
    passes while PostgreSQL is not running would hide the failure it exists to catch."""
    VERIFY_TIMEOUT.validate(timeout_s)
    rules = build_rules(patterns, [check_data_dir(d) for d in data_dirs], score, None)
    # As in `pgoom watch`: the fallbacks guess, so only with the default pattern.
    fallback = not (patterns or data_dirs)
    procfs = procfs or ProcFS()
    start = time.monotonic()
    deadline = start + timeout_s
    while True:
        found = find_postmasters(procfs, rules, score, fallback)
        elapsed_s = time.monotonic() - start
        if found and all(f.ok for f in found):
            return _result(EXIT_OK, found, rules, score, timeout_s, elapsed_s, as_json)
        if time.monotonic() >= deadline:
            code = EXIT_CHECK_FAILED if found else EXIT_NOT_FOUND
            if found and all(f.protected for f in found):
                code = EXIT_GROUP_KILL
            return _result(code, found, rules, score, timeout_s, elapsed_s, as_json)
        time.sleep(min(poll_interval_s, max(0.0, deadline - time.monotonic())))


def _describe(f: Found) -> str:
    where = f" ({f.data_dir})" if f.data_dir else ""
    adj = "exited" if f.oom_score_adj is None else f"oom_score_adj {f.oom_score_adj}"
    return f"pid {f.pid}{where} {adj}"


def _group_kill_where(f: Found) -> str:
    where = (f.cgroup or {}).get("group_kill_at") or (f.cgroup or {}).get("path")
    return f" (memory.oom.group=1 in {where})" if where else ""


def _reason(code: int, found: list[Found], rules: list[Rule], score: int, timeout_s: float) -> str:
    if code == EXIT_OK:
        listed = ", ".join(_describe(f) for f in found)
        return f"ok: {len(found)} postmaster(s) at or below {score}: {listed}"
    if code == EXIT_NOT_FOUND:
        names = "; ".join(r.name for r in rules)
        return (
            f"pgoom: no postmaster found within {timeout_s:g} s (looked for {names}): "
            "is PostgreSQL running, and do --pattern/--data-dir name it?"
        )
    if code == EXIT_GROUP_KILL:
        dying = [f for f in found if f.survives_group_kill is False]
        listed = ", ".join(_describe(f) + _group_kill_where(f) for f in dying)
        return (
            f"pgoom: at or below {score} but would die in a group kill: {listed}: only -1000 "
            "survives one; run `pgoom watch` with --group-kill auto (-1000, needs "
            "CAP_SYS_RESOURCE) or ungroup (memory.oom.group=0, needs the cgroupfs writable)"
        )
    bad = [f for f in found if not f.protected]
    listed = ", ".join(_describe(f) for f in bad)
    return (
        f"pgoom: not protected within {timeout_s:g} s: {listed}, expected at or below {score}: "
        "is `pgoom watch` running with the same rules?"
    )


def _result(
    code: int,
    found: list[Found],
    rules: list[Rule],
    score: int,
    timeout_s: float,
    elapsed_s: float,
    as_json: bool,
) -> tuple[int, str]:
    reason = _reason(code, found, rules, score, timeout_s)
    if not as_json:
        return code, reason
    doc = {
        "ok": code == EXIT_OK,
        "exit_code": code,
        "reason": reason.removeprefix("pgoom: "),
        "score": score,
        "timeout_s": timeout_s,
        "elapsed_s": round(elapsed_s, 3),
        "postmasters": [asdict(f) for f in found],
    }
    return code, json.dumps(doc, indent=2)
