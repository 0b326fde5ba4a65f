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
from typing import Optional, Protocol

from loguru import logger

from watcher.adjust import Adjuster, Outcome, Result
from watcher.config import Settings
from watcher.discover import Finding, discover, judge
from watcher.errors import AccessDenied, ProcessGone
from watcher.events import (
    Adjusted,
    ChildAdjusted,
    Exited,
    Failed,
    Kept,
    Listener,
    Notice,
    Ready,
    Refused,
    Rescanned,
)
from watcher.match import Facts, Rule, cmdline_text, might_be_postmaster
from watcher.outcomes import OutcomeLog
from watcher.parse import Stat
from watcher.procfs import ProcFS
from watcher.sources.base import Event, Examine, Forked, Rescan, Source


class Attachment(Protocol):
    """Something else the loop serves besides the source (the guard): one pollable fd, and
    a deadline (None: no timer, so an idle loop stays at 0 wakeups). The engine knows
    nothing else about it; what it watches it learns from the listeners' notices."""

    def fileno(self) -> int: ...

    def deadline_s(self) -> Optional[float]: ...

    def on_ready(self) -> None: ...

    def on_timer(self, now_s: float) -> None: ...


@dataclass
class Protected:
    pid: int
    starttime_ticks: int
    data_dir: Optional[str]
    rule: Rule
    score_ok: bool  # False while the kernel refuses the target (EACCES): retried at verify
    children_done: set[tuple[int, int]] = field(default_factory=set)


@dataclass
class Counters:
    events: int = 0
    adjustments: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    drift_repairs: int = 0


class Engine:
    def __init__(self, settings: Settings, source: Source, procfs: Optional[ProcFS] = None) -> None:
        self.settings = settings
        self.source = source
        self.procfs = procfs or ProcFS(settings.proc_root)
        self.adjuster = Adjuster(self.procfs, dry_run=settings.dry_run)
        self.protected: dict[int, Protected] = {}
        self.counters = Counters()
        # The outcome log listens like the others (watcher.outcomes); metrics and systemd
        # notification are attached by `pgoom watch`.
        self.listeners: list[Listener] = [OutcomeLog()]
        self.attachments: list[Attachment] = []
        self.guards: Optional[object] = None  # `--guard`'s watcher.guard.Guards, for metrics
        self._stop = False
        self._stop_signal: Optional[str] = None
        self._wake_r, self._wake_w = socket.socketpair()
        # Without fork events (inotify, poll) children of protected postmasters are found by
        # scanning every --interval; with netlink the Forked events cover them.
        self._scan_children = not source.reports_forks and any(
            r.children_score is not None for r in settings.rules
        )

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
        for attachment in self.attachments:
            selector.register(attachment.fileno(), selectors.EVENT_READ, attachment)
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
                if self._scan_children and self.protected:
                    deadlines.append(next_children)
                deadlines += [d for a in self.attachments if (d := a.deadline_s()) is not None]
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
                if self._scan_children and now >= next_children:
                    self.adjust_children()
                    next_children = now + self.settings.interval_s
                self._serve_attachments([key.data for key, _ in ready])
        finally:
            selector.close()
            self.source.close()
            logger.info("stopped")

    def _serve_attachments(self, ready: list[object]) -> None:
        for attachment in self.attachments:
            if attachment in ready:
                attachment.on_ready()
            deadline = attachment.deadline_s()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                attachment.on_timer(now)

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
        result = self.adjuster.set_score(pid, start, rule.score, only_lower=True)
        latency_us = (time.monotonic_ns() - ts_ns) // 1000 if ts_ns else None
        self._record(facts, rule, result, latency_us, finding.method)
        return result

    def _record(
        self, facts: Facts, rule: Rule, result: Result, latency_us: Optional[int], method: str
    ) -> None:
        """Keep the protected set in step with the write's outcome, then tell the listeners."""
        pid, start = facts.pid, facts.stat.starttime_ticks
        if result.outcome is Outcome.GONE:
            logger.debug("pid {} exited before it could be protected", pid)
            return
        known = self.protected.get(pid)
        if known is None or known.starttime_ticks != start:
            known = Protected(pid, start, facts.data_dir, rule, score_ok=True)
            self.protected[pid] = known
            if facts.data_dir:
                self.source.add_data_dir(facts.data_dir)
        known.score_ok = result.outcome is not Outcome.DENIED
        if result.outcome is Outcome.ADJUSTED:
            self.counters.adjustments += 1
            self._emit(
                Adjusted(
                    pid=pid,
                    data_dir=facts.data_dir,
                    old=result.old,
                    new=rule.score,
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
                    target=rule.score,
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
                    message=result.reason,
                    protected=len(self.protected),
                )
            )

    def forked(self, event: Forked) -> None:
        parent = self.protected.get(event.parent)
        if parent is None or parent.rule.children_score is None:
            return
        self._adjust_child(parent, event.child)

    def _adjust_child(self, parent: Protected, child: int) -> None:
        assert parent.rule.children_score is not None
        try:
            stat = self.procfs.stat(child)
        except (ProcessGone, AccessDenied):
            return
        key = (child, stat.starttime_ticks)
        if stat.ppid != parent.pid or key in parent.children_done:
            return
        result = self.adjuster.set_score(child, stat.starttime_ticks, parent.rule.children_score)
        if result.outcome in (Outcome.ADJUSTED, Outcome.UNCHANGED, Outcome.DRY_RUN):
            parent.children_done.add(key)
        if result.outcome in (Outcome.ADJUSTED, Outcome.DENIED):
            denied = result.reason if result.outcome is Outcome.DENIED else ""
            self._emit(
                ChildAdjusted(
                    child, stat.starttime_ticks, parent.pid, result.old, result.new, denied
                )
            )

    def adjust_children(self) -> None:
        """Without fork events (inotify, poll), children are found by scanning."""
        for parent in list(self.protected.values()):
            if parent.rule.children_score is None:
                continue
            try:
                children = self.procfs.children(parent.pid)
            except (ProcessGone, AccessDenied):
                continue
            for child in children:
                self._adjust_child(parent, child)
            alive = set(children)
            parent.children_done = {k for k in parent.children_done if k[0] in alive}

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
                pid, known.starttime_ticks, known.rule.score, only_lower=True
            )
            if result.outcome is Outcome.ADJUSTED:
                self.counters.drift_repairs += 1
                known.score_ok = True
                self._emit(
                    Adjusted(
                        pid=pid,
                        data_dir=known.data_dir,
                        old=result.old,
                        new=known.rule.score,
                        source="verify",
                        latency_us=None,
                        method="drift",
                        protected=len(self.protected),
                    )
                )
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
