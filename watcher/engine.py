"""Subscribe → scan → react: the loop behind `pgoom watch` (and `pgoom exec`'s monitor).

The source is opened (subscribed) before the first scan of /proc: in the other order a
postmaster that starts between the scan and the subscription would be missed.
"""

from __future__ import annotations

import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from loguru import logger

from watcher.adjust import Adjuster, Outcome, Result
from watcher.config import Settings
from watcher.errors import AccessDenied, ProcessGone
from watcher.groupkill import cannot_lower_message, kills_as_group, survives_group_kill
from watcher.identity import inspect
from watcher.match import (
    OOM_SCORE_ADJ_MIN,
    Facts,
    Rule,
    cmdline_text,
    confirm,
    might_be_postmaster,
)
from watcher.parse import Stat
from watcher.policy import Applied, GroupKillPolicy
from watcher.procfs import ProcFS
from watcher.scan import PATTERN, candidates
from watcher.sources.base import Event, Examine, Forked, Rescan, Source

Listener = Callable[[str, dict[str, Any]], None]


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
        self.listeners: list[Listener] = []
        self._reported: set[tuple[int, int, str]] = set()  # (pid, start, reason) logged once
        self._stop = False
        self._stop_signal: Optional[str] = None
        self._wake_r, self._wake_w = socket.socketpair()
        # Without fork events (inotify, poll) children of protected postmasters are found by
        # scanning every --interval; with netlink the Forked events cover them. A postmaster
        # the group-kill policy puts at -1000 needs its children moved too, whatever the rules.
        self._fork_events = source.name == "netlink"

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        self._install_signal_handlers()
        self.scan("start")
        self._emit("ready", source=self.source.name, protected=len(self.protected))
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
                    self.verify(full_scan=not event_driven)
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
                self._emit("rescan", reason=event.reason)
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
        return self._inspect_and_protect(pid, argv, ts_ns, PATTERN)

    def _inspect_and_protect(
        self, pid: int, argv: list[str], ts_ns: int, method: str
    ) -> Optional[Result]:
        try:
            facts = inspect(self.procfs, pid, argv=argv)
        except (ProcessGone, AccessDenied) as err:
            logger.debug("pid {} vanished before it could be examined: {}", pid, err)
            return None
        return self._protect_if_postmaster(facts, ts_ns, method=method)

    def _protect_if_postmaster(self, facts: Facts, ts_ns: int, method: str) -> Optional[Result]:
        pid, start = facts.pid, facts.stat.starttime_ticks
        text = cmdline_text(facts.argv)
        rule = next((r for r in self.settings.rules if r.matches(text, facts.data_dir)), None)
        if rule is None and method != PATTERN:
            rule = self.settings.rules[0]
        if rule is None:
            return None
        verdict = confirm(facts)
        if not verdict.ok:
            self._once(
                pid,
                start,
                verdict.reason,
                "info",
                "not protecting pid {} ({}): {}",
                pid,
                text[:120],
                verdict.reason,
            )
            return None
        # The cgroup is read for every new postmaster: a restarted container is a new cgroup
        # (kubelet sets memory.oom.group=1 again), and the plan decides the score to write.
        applied = self.group_policy.apply(pid, rule.score, rule.children_score)
        for error in applied.errors:
            self._once(pid, start, "group-kill-error", "error", "{}", error)
        if applied.plan.note:
            self._once(
                pid, start, "group-kill-note", applied.plan.note_level, "{}", applied.plan.note
            )
        result = self.adjuster.set_score(pid, start, applied.plan.score, only_lower=True)
        latency_us = (time.monotonic_ns() - ts_ns) // 1000 if ts_ns else None
        self._record(facts, rule, result, latency_us, method, applied)
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
        fields = dict(
            pid=pid,
            data_dir=facts.data_dir,
            old=result.old,
            new=target,
            source=self.source.name,
            latency_us=latency_us,
            method=method,
        )
        if result.outcome is Outcome.ADJUSTED:
            self.counters.adjustments += 1
            logger.bind(**fields).info(
                "protected postmaster pid={} data_dir={} oom_score_adj {} -> {} source={} "
                "latency_us={}",
                pid,
                facts.data_dir,
                result.old,
                result.new,
                self.source.name,
                latency_us if latency_us is not None else "-",
            )
            self._emit("adjusted", **fields)
        elif result.outcome is Outcome.DRY_RUN:
            self._once(
                pid,
                start,
                "dry-run",
                "info",
                "dry run: would set postmaster pid={} data_dir={} oom_score_adj {} -> {}",
                pid,
                facts.data_dir,
                result.old,
                target,
            )
        elif result.outcome is Outcome.UNCHANGED:
            self._once(
                pid,
                start,
                "unchanged",
                "info",
                "postmaster pid={} data_dir={} already at oom_score_adj {} (target {})",
                pid,
                facts.data_dir,
                result.old,
                target,
            )
        elif result.outcome is Outcome.DENIED:
            self.counters.failures["denied"] = self.counters.failures.get("denied", 0) + 1
            self._emit("failed", reason="denied", pid=pid, data_dir=facts.data_dir)
            self._once(pid, start, "denied", "error", "{}", self._denied_reason(known, result))

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
        if result.outcome is Outcome.ADJUSTED:
            logger.debug(
                "child pid={} of postmaster {}: oom_score_adj {} -> {}",
                child,
                parent.pid,
                result.old,
                result.new,
            )
        elif result.outcome is Outcome.DENIED:
            self._once(child, stat.starttime_ticks, "denied", "warning", "{}", result.reason)

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
                logger.warning(
                    "child pid={} of postmaster {} was at -1000: set to {} (no child may stay "
                    "unkillable beside a postmaster at -1000)",
                    child,
                    parent.pid,
                    children_score,
                )

    # --- scanning and verifying ------------------------------------------------------------

    def scan(self, reason: str) -> None:
        """Examine every process a rule may cover; the seed's fallbacks (b) and (c) only
        when no rule's first look matched anything (watcher.scan)."""
        logger.debug("scanning /proc ({})", reason)
        for found in candidates(self.procfs, self.settings.rules, self.settings.fallback):
            self._inspect_and_protect(found.pid, found.argv, 0, found.method)

    def verify(self, full_scan: bool = False) -> None:
        """Drift repair: a runtime or an operator may reset a protected postmaster's score.
        Without netlink this tick also rescans, to find postmasters no event announced."""
        for pid, known in list(self.protected.items()):
            try:
                stat: Optional[Stat] = self.procfs.stat(pid)
            except (ProcessGone, AccessDenied):
                stat = None
            if stat is None or stat.starttime_ticks != known.starttime_ticks or stat.state == "Z":
                logger.info("postmaster pid={} data_dir={} exited", pid, known.data_dir)
                del self.protected[pid]
                self._emit("exited", pid=pid, data_dir=known.data_dir)
                continue
            result = self.adjuster.set_score(
                pid, known.starttime_ticks, known.target, only_lower=True
            )
            if result.outcome is Outcome.DENIED:
                # Retried every tick; reported once (then at debug), like the first refusal.
                reason = self._denied_reason(known, result)
                self._once(pid, known.starttime_ticks, "denied", "error", "{}", reason)
            if result.outcome is Outcome.ADJUSTED:
                self.counters.drift_repairs += 1
                known.score_ok = True
                logger.warning(
                    "drift repaired: postmaster pid={} data_dir={} had oom_score_adj {}, set "
                    "back to {}",
                    pid,
                    known.data_dir,
                    result.old,
                    result.new,
                )
                self._emit(
                    "adjusted",
                    pid=pid,
                    data_dir=known.data_dir,
                    old=result.old,
                    new=result.new,
                    source="verify",
                    latency_us=None,
                    method="drift",
                )
        self.adjust_children(only_minus_1000=True)
        if full_scan:
            self.scan("periodic")

    # --- plumbing --------------------------------------------------------------------------

    def _once(self, pid: int, start: int, key: str, level: str, message: str, *args: Any) -> None:
        """Log a per-process condition once (then at debug): an EACCES must not flood."""
        marker = (pid, start, key)
        if marker in self._reported:
            logger.debug(message, *args)
            return
        self._reported.add(marker)
        if len(self._reported) > 10000:
            self._reported.clear()
        logger.log(level.upper(), message, *args)

    def _emit(self, name: str, **fields: Any) -> None:
        for listener in self.listeners:
            try:
                listener(name, fields)
            except Exception as err:  # a broken metrics hook must not stop protection
                logger.opt(exception=err).warning("listener failed on {}", name)

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
