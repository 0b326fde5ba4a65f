"""Subscribe → scan → react: the loop behind `pgoom watch` (and `pgoom exec`'s monitor).

The source is opened (subscribed) before the first scan of /proc: in the other order a
postmaster that starts between the scan and the subscription would be missed.
"""

from __future__ import annotations

import selectors
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Optional

from loguru import logger

from watcher.adjust import Adjuster, Outcome, Result
from watcher.config import Settings
from watcher.discover import Finding, discover, judge
from watcher.errors import AccessDenied, ProcessGone
from watcher.events import (
    Adjusted,
    ChildAdjusted,
    ChildOffMinus1000,
    Exited,
    Failed,
    GroupKillNote,
    Kept,
    Listener,
    Notice,
    Ready,
    Refused,
    Rescanned,
)
from watcher.groupkill import cannot_lower_message, kills_as_group, survives_group_kill
from watcher.limits import OOM_SCORE_ADJ_MIN
from watcher.match import Facts, Rule, cmdline_text, might_be_postmaster
from watcher.outcomes import OutcomeLog
from watcher.parse import Stat
from watcher.policy import Applied, GroupKillPolicy
from watcher.procfs import ProcFS
from watcher.sources.base import Event, Examine, Forked, Rescan, Source


@dataclass
class Protected:
    pid: int
    starttime_ticks: int
    data_dir: Optional[str]
    rule: Rule
    score_ok: bool  # False while the kernel refuses the target (EACCES): retried at verify
    children_done: set[tuple[int, int]] = field(default_factory=set)
    # The group-kill policy's plan: the score and children's score actually in force (-1000
    # and the children score where the cgroup kills as a group), and the cgroup it read.
    applied: Optional[Applied] = None

    @property
    def target(self) -> int:
        return self.rule.score if self.applied is None else self.applied.plan.score

    @property
    def children_score(self) -> Optional[int]:
        if self.applied is None:
            return self.rule.children_score
        return self.applied.plan.children_score

    @property
    def group_kill(self) -> Optional[bool]:
        """Does its cgroup kill as a group now (after an ungroup write, as read back)?"""
        if self.applied is None:
            return None
        if self.applied.ungrouped:
            # Read back after the write: a flagged ancestor still kills it as a group.
            return kills_as_group(self.applied.facts)
        return self.applied.plan.group_kill

    @property
    def survives_group_kill(self) -> Optional[bool]:
        group = self.group_kill
        if not self.score_ok:
            # The kernel refused the target: the postmaster is above it, so above -1000.
            return True if group is False else (None if group is None else False)
        return survives_group_kill(self.target, group)


@dataclass
class Counters:
    events: int = 0
    adjustments: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    drift_repairs: int = 0
    children_off_minus_1000: int = 0  # children found at -1000 beside a -1000 postmaster


class Engine:
    def __init__(self, settings: Settings, source: Source, procfs: Optional[ProcFS] = None) -> None:
        self.settings = settings
        self.source = source
        self.procfs = procfs or ProcFS(settings.proc_root)
        self.adjuster = Adjuster(self.procfs, dry_run=settings.dry_run)
        self.group_policy = GroupKillPolicy(
            self.procfs, settings.group_kill, settings.dry_run, settings.cgroup_root
        )
        self.protected: dict[int, Protected] = {}
        self.counters = Counters()
        # The outcome log listens like the others (watcher.outcomes); metrics and systemd
        # notification are attached by `pgoom watch`.
        self.listeners: list[Listener] = [OutcomeLog()]
        self._stop = False
        self._stop_signal: Optional[str] = None
        self._wake_r, self._wake_w = socket.socketpair()
        # Without fork events (inotify, poll) children of protected postmasters are found by
        # scanning every --interval; with netlink the Forked events cover them. A postmaster
        # the group-kill policy puts at -1000 needs its children moved too, whatever the rules.
        self._fork_events = source.reports_forks

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        self._install_signal_handlers()
        self.scan("start")
        self._emit(Ready(source=self.source.name, protected=len(self.protected)))
        logger.info(
            "watching with source {} ({} rule(s)); {} postmaster(s) protected",
            self.source.name,
            len(self.settings.rules),
            len(self.protected),
        )
        selector = selectors.DefaultSelector()
        fd = self.source.fileno()
        if fd is not None:
            selector.register(fd, selectors.EVENT_READ, "source")
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        event_driven = self.source.timeout_s() is None
        next_verify = time.monotonic() + self.settings.verify_interval_s
        next_children = time.monotonic() + self.settings.interval_s
        next_source = self._deadline(self.source.timeout_s())
        try:
            while not self._stop:
                now = time.monotonic()
                deadlines = [next_source] if next_source is not None else []
                # Idle event mode has no timer unless there is something to verify: 0 wakeups.
                if self.protected or not event_driven:
                    deadlines.append(next_verify)
                if self._scan_children():
                    deadlines.append(next_children)
                timeout = max(0.0, min(deadlines) - now) if deadlines else None
                ready = selector.select(timeout)
                for key, _ in ready:
                    if key.data == "wake":
                        self._drain_wakeups()
                if self._stop:
                    logger.info("received {}, stopping", self._stop_signal or "stop")
                    break
                now = time.monotonic()
                if any(key.data == "source" for key, _ in ready) or (
                    next_source is not None and now >= next_source
                ):
                    self.handle(self.source.read())
                    next_source = self._deadline(self.source.timeout_s())
                if now >= next_verify:
                    self.repair_drift(full_scan=not event_driven)
                    next_verify = now + self.settings.verify_interval_s
                if self._scan_children() and now >= next_children:
                    self.adjust_children()
                    next_children = now + self.settings.interval_s
        finally:
            selector.close()
            self.source.close()
            logger.info("stopped")

    def stop(self) -> None:
        self._stop = True
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def handle(self, events: list[Event]) -> None:
        for event in events:
            self.counters.events += 1
            if isinstance(event, Examine):
                self.examine(event.pid, event.ts_ns)
            elif isinstance(event, Forked):
                self.forked(event)
            elif isinstance(event, Rescan):
                self._emit(Rescanned(reason=event.reason))
                self.scan(event.reason)

    # --- reacting ------------------------------------------------------------------------

    def examine(self, pid: int, ts_ns: int = 0) -> Optional[Result]:
        """Protect `pid` if it is a postmaster some rule covers. Cheap for everything else:
        one read of its command line."""
        try:
            argv = self.procfs.cmdline(pid)
        except (ProcessGone, AccessDenied):
            return None
        if might_be_postmaster(argv, self.settings.rules) is None:
            return None
        finding = judge(self.procfs, pid, argv, self.settings.rules)
        return None if finding is None else self._protect(finding, ts_ns)

    def _protect(self, finding: Finding, ts_ns: int) -> Optional[Result]:
        rule, facts, verdict = finding.rule, finding.facts, finding.verdict
        if rule is None:
            return None
        pid, start = facts.pid, facts.stat.starttime_ticks
        if not verdict.ok:
            text = cmdline_text(facts.argv)[:120]
            self._emit(Refused(pid=pid, start=start, cmdline=text, reason=verdict.reason))
            return None
        # The cgroup is read for every new postmaster: a restarted container is a new cgroup
        # (kubelet sets memory.oom.group=1 again), and the plan decides the score to write.
        applied = self.group_policy.apply(pid, rule.score, rule.children_score)
        for error in applied.errors:
            self._emit(GroupKillNote(pid, start, "group-kill-error", "error", error))
        if applied.plan.note:
            self._emit(
                GroupKillNote(
                    pid, start, "group-kill-note", applied.plan.note_level, applied.plan.note
                )
            )
        result = self.adjuster.set_score(pid, start, applied.plan.score, only_lower=True)
        latency_us = (time.monotonic_ns() - ts_ns) // 1000 if ts_ns else None
        self._record(facts, rule, result, latency_us, finding.method, applied)
        return result

    def _record(
        self,
        facts: Facts,
        rule: Rule,
        result: Result,
        latency_us: Optional[int],
        method: str,
        applied: Optional[Applied] = None,
    ) -> None:
        """Keep the protected set in step with the write's outcome, then tell the listeners."""
        pid, start = facts.pid, facts.stat.starttime_ticks
        if result.outcome is Outcome.GONE:
            logger.debug("pid {} exited before it could be protected", pid)
            return
        known = self.protected.get(pid)
        if known is None or known.starttime_ticks != start:
            known = Protected(pid, start, facts.data_dir, rule, score_ok=True, applied=applied)
            self.protected[pid] = known
            if facts.data_dir:
                self.source.add_data_dir(facts.data_dir)
        if applied is not None:
            known.applied = applied  # a rescan reads the cgroup again
        known.score_ok = result.outcome is not Outcome.DENIED
        target = known.target
        if result.outcome is Outcome.ADJUSTED:
            self.counters.adjustments += 1
            self._emit(
                Adjusted(
                    pid=pid,
                    data_dir=facts.data_dir,
                    old=result.old,
                    new=target,
                    source=self.source.name,
                    latency_us=latency_us,
                    method=method,
                    protected=len(self.protected),
                )
            )
        elif result.outcome in (Outcome.DRY_RUN, Outcome.UNCHANGED):
            self._emit(
                Kept(
                    pid=pid,
                    start=start,
                    data_dir=facts.data_dir,
                    old=result.old,
                    target=target,
                    dry_run=result.outcome is Outcome.DRY_RUN,
                )
            )
        elif result.outcome is Outcome.DENIED:
            self.counters.failures["denied"] = self.counters.failures.get("denied", 0) + 1
            self._emit(
                Failed(
                    pid=pid,
                    start=start,
                    data_dir=facts.data_dir,
                    reason="denied",
                    message=self._denied_reason(known, result),
                    protected=len(self.protected),
                )
            )

    @staticmethod
    def _denied_reason(known: Protected, result: Result) -> str:
        applied = known.applied
        if (
            applied is not None
            and applied.plan.group_kill is not False
            and known.target == OOM_SCORE_ADJ_MIN
        ):
            # The one error says what the group kill needs, not only what the kernel said.
            return cannot_lower_message(known.pid, applied.facts, result.reason)
        return result.reason

    def forked(self, event: Forked) -> None:
        parent = self.protected.get(event.parent)
        if parent is None or parent.children_score is None:
            return
        self._adjust_child(parent, event.child)

    def _adjust_child(self, parent: Protected, child: int) -> None:
        children_score = parent.children_score
        assert children_score is not None
        try:
            stat = self.procfs.stat(child)
        except (ProcessGone, AccessDenied):
            return
        key = (child, stat.starttime_ticks)
        if stat.ppid != parent.pid or key in parent.children_done:
            return
        result = self.adjuster.set_score(child, stat.starttime_ticks, children_score)
        if result.outcome in (Outcome.ADJUSTED, Outcome.UNCHANGED, Outcome.DRY_RUN):
            parent.children_done.add(key)
        if result.outcome in (Outcome.ADJUSTED, Outcome.DENIED):
            denied = result.reason if result.outcome is Outcome.DENIED else ""
            self._emit(
                ChildAdjusted(
                    child, stat.starttime_ticks, parent.pid, result.old, result.new, denied
                )
            )

    def _scan_children(self) -> bool:
        return not self._fork_events and any(
            p.children_score is not None for p in self.protected.values()
        )

    def adjust_children(self, only_minus_1000: bool = False) -> None:
        """Without fork events (inotify, poll), children are found by scanning. With
        `only_minus_1000` (every verify tick, whatever the source): the children of
        postmasters at -1000, so that none is left unkillable beside it."""
        for parent in list(self.protected.values()):
            if parent.children_score is None:
                continue
            if only_minus_1000:
                if parent.target == OOM_SCORE_ADJ_MIN:
                    self._children_off_minus_1000(parent)
                continue
            try:
                children = self.procfs.children(parent.pid)
            except (ProcessGone, AccessDenied):
                continue
            for child in children:
                self._adjust_child(parent, child)
            alive = set(children)
            parent.children_done = {k for k in parent.children_done if k[0] in alive}

    def _children_off_minus_1000(self, parent: Protected) -> None:
        """No child stays at -1000 beside a postmaster there: an unkillable runaway backend
        would leave the OOM killer nothing to kill but its siblings. Reads every child's
        score (a child may have written its own PG_OOM_ADJUST_VALUE after pgoom's write)."""
        children_score = parent.children_score
        assert children_score is not None
        try:
            children = self.procfs.children(parent.pid)
        except (ProcessGone, AccessDenied):
            return
        for child in children:
            try:
                stat = self.procfs.stat(child)
                if stat.ppid != parent.pid or self.procfs.oom_score_adj(child) != OOM_SCORE_ADJ_MIN:
                    continue
            except (ProcessGone, AccessDenied):
                continue
            result = self.adjuster.set_score(child, stat.starttime_ticks, children_score)
            if result.outcome is Outcome.ADJUSTED:
                self.counters.children_off_minus_1000 += 1
                self._emit(ChildOffMinus1000(child, parent.pid, children_score))

    # --- scanning and verifying ------------------------------------------------------------

    def scan(self, reason: str) -> None:
        """Examine every process a rule may cover; the fallbacks (the parent of other
        postgres processes, else the only one) only when no rule's first look matched
        anything (watcher.discover)."""
        logger.debug("scanning /proc ({})", reason)
        for finding in discover(self.procfs, self.settings.rules, self.settings.fallback):
            self._protect(finding, 0)

    def repair_drift(self, full_scan: bool = False) -> None:
        """Drift repair: a runtime or an operator may reset a protected postmaster's score.
        Without netlink this tick also rescans, to find postmasters no event announced."""
        for pid, known in list(self.protected.items()):
            try:
                stat: Optional[Stat] = self.procfs.stat(pid)
            except (ProcessGone, AccessDenied):
                stat = None
            if stat is None or stat.starttime_ticks != known.starttime_ticks or stat.state == "Z":
                del self.protected[pid]
                self._emit(Exited(pid=pid, data_dir=known.data_dir, protected=len(self.protected)))
                continue
            result = self.adjuster.set_score(
                pid, known.starttime_ticks, known.target, only_lower=True
            )
            if result.outcome is Outcome.DENIED:
                # Retried every tick; the outcome log reports it once (then at debug). Not
                # counted again: pgoom_failures_total counts postmasters, not retries.
                self._emit(
                    Failed(
                        pid=pid,
                        start=known.starttime_ticks,
                        data_dir=known.data_dir,
                        reason="denied",
                        message=self._denied_reason(known, result),
                        protected=len(self.protected),
                    )
                )
            if result.outcome is Outcome.ADJUSTED:
                self.counters.drift_repairs += 1
                known.score_ok = True
                self._emit(
                    Adjusted(
                        pid=pid,
                        data_dir=known.data_dir,
                        old=result.old,
                        new=known.target,
                        source="verify",
                        latency_us=None,
                        method="drift",
                        protected=len(self.protected),
                    )
                )
        self.adjust_children(only_minus_1000=True)
        if full_scan:
            self.scan("periodic")

    # --- plumbing --------------------------------------------------------------------------

    def _emit(self, notice: Notice) -> None:
        for listener in self.listeners:
            try:
                listener(notice)
            except Exception as err:  # a broken metrics hook must not stop protection
                logger.opt(exception=err).warning("listener failed on {}", type(notice).__name__)

    @staticmethod
    def _deadline(timeout_s: Optional[float]) -> Optional[float]:
        return None if timeout_s is None else time.monotonic() + timeout_s

    def _install_signal_handlers(self) -> None:
        self._wake_w.setblocking(False)
        self._wake_r.setblocking(False)

        def _handler(signum: int, _frame: object) -> None:
            # Only a flag and a wakeup: logging here could wait on the logger's lock, which
            # the interrupted main thread may be holding. The loop logs the stop.
            self._stop_signal = signal.Signals(signum).name
            self.stop()

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except (BlockingIOError, InterruptedError):
            pass
