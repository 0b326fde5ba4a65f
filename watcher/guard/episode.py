"""One postmaster's guard: a pressure episode from the wakeup to relief, as a small state
machine driven by two calls, `on_pressure()` (the kernel woke us) and `on_timer()` (a
deadline the guard asked for passed). It reads through injected callables and signals
through one, so unit tests drive it with fake samples and a fake clock.

WATCHING  --pressure, working set >= threshold, a victim-->  ACTING (SIGINT sent; SIGTERM
                                                              for an idle session)
ACTING    --working set < relief level-->                    WATCHING (outcome: relieved)
ACTING    --grace over, after SIGINT-->                      ACTING (SIGTERM sent)
ACTING    --grace over, after SIGTERM-->                     COOLDOWN (outcome: no relief)
COOLDOWN  --cooldown over, at the next pressure-->           WATCHING

Only ACTING has a timer (every check interval, until relief or the grace ends): while
memory is fine the guard costs no wakeup at all.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from loguru import logger

from watcher.guard.memory import Sample
from watcher.guard.signals import Sent
from watcher.guard.victim import Candidate, Child, choose

MIB = 1 << 20

WATCHING = "watching"
ACTING = "acting"
COOLDOWN = "cooldown"

# Outcomes of one signal, as counted in metrics and logged.
RELIEVED = "relieved"
NO_RELIEF = "no_relief"
GONE = "gone"
DENIED = "denied"
DRY_RUN = "dry_run"

Report = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class GuardSettings:
    """Conservative defaults (docs/guard.md explains each)."""

    threshold_pct: float = 90.0  # act when the working set reaches this share of the limit
    grace_s: float = 1.0  # how long a signal has to bring the working set below the threshold
    cooldown_s: float = 10.0  # after an episode without relief, pressure is only counted
    floor_bytes: int = 8 * MIB  # a backend with less private memory is never a victim
    dry_run: bool = False
    check_interval_s: float = 0.005  # while ACTING only: how often relief is checked
    # Relief is the working set back below the threshold by this share of the limit: a
    # cancel that gives back a few pages of executor memory while the session keeps the
    # rest (local buffers, caches) has not ended the episode.
    relief_margin_pct: float = 5.0
    # The victim must also hold this share of the limit: the guard stops the query that
    # explains the pressure, not the largest of many bystanders. Measured with the OOM
    # harness's non-postgres hog: without it, an idle session of ~12 of 300 MiB was
    # terminated and the kernel killed the hog anyway.
    victim_share_pct: float = 10.0

    def threshold_bytes(self, limit_bytes: int) -> int:
        return int(limit_bytes * self.threshold_pct / 100.0)

    def relief_bytes(self, limit_bytes: int) -> int:
        return int(limit_bytes * max(0.0, self.threshold_pct - self.relief_margin_pct) / 100.0)


@dataclass
class Counters:
    pressure_events: dict[str, int] = field(default_factory=dict)  # by signal
    actions: dict[tuple[str, str], int] = field(default_factory=dict)  # (signal, outcome)
    kernel_oom_events: int = 0
    no_victim: int = 0


@dataclass
class _Act:
    candidate: Candidate
    signum: signal.Signals
    event_ns: int  # when the wakeup that started the episode was received
    signal_ns: int
    sample: Sample  # the reading that decided it
    grace_until_s: float


class Guard:
    def __init__(
        self,
        postmaster_pid: int,
        group_name: str,
        sample: Callable[[], Sample],
        children: Callable[[], list[Child]],
        send: Callable[[int, int, signal.Signals], Sent],
        settings: GuardSettings,
        report: Optional[Report] = None,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.postmaster_pid = postmaster_pid
        self.group_name = group_name
        self._sample = sample
        self._children = children
        self._send = send
        self.settings = settings
        self._report = report or (lambda name, fields: None)
        self._clock_ns = clock_ns
        self.state = WATCHING
        self.counters = Counters()
        self.last_sample: Optional[Sample] = None
        self.last_action: Optional[dict[str, Any]] = None
        self._act: Optional[_Act] = None
        self._next_check_s: Optional[float] = None
        self._cooldown_until_s = 0.0
        self._no_victim_logged = False

    # --- the two entry points ------------------------------------------------------------

    def on_pressure(self, signal_name: str, event_ns: Optional[int] = None) -> None:
        event_ns = event_ns if event_ns is not None else self._clock_ns()
        events = self.counters.pressure_events
        events[signal_name] = events.get(signal_name, 0) + 1
        self._report("guard_pressure", {"postmaster": self.postmaster_pid, "signal": signal_name})
        if signal_name == "oom":
            self._kernel_oom()
            return
        if self.state == ACTING:
            return  # the timer is already checking
        now_s = event_ns / 1e9
        if self.state == COOLDOWN:
            if now_s < self._cooldown_until_s:
                return
            self.state = WATCHING
        self._decide(event_ns)

    def deadline_s(self) -> Optional[float]:
        """The monotonic time (s) the guard wants on_timer() called; None: no timer."""
        return self._next_check_s if self.state == ACTING else None

    def on_timer(self) -> None:
        act = self._act
        if self.state != ACTING or act is None:
            self._next_check_s = None
            return
        now_ns = self._clock_ns()
        sample = self._read()
        if self._relieved(sample):
            assert sample is not None
            self._finish(act, RELIEVED, now_ns, sample)
            # The episode is over: the next crossing is a new allocation, a new episode
            # (measured: a cooldown after relief let the next runaway query, 2.5 s later,
            # reach the kernel's OOM killer). Crossings on the way down read below the
            # threshold and do nothing.
            self._act = None
            self._next_check_s = None
            self.state = WATCHING
            return
        if now_ns / 1e9 < act.grace_until_s:
            self._next_check_s = now_ns / 1e9 + self.settings.check_interval_s
            return
        self._finish(act, NO_RELIEF, now_ns, sample)
        if act.signum == signal.SIGINT:
            # The cancel did not give the memory back (the backend ignored it, or what it
            # holds is the session's, not the query's): end the session, as a DBA would.
            self._signal(act.candidate, signal.SIGTERM, act.event_ns, sample or act.sample)
        else:
            # Never SIGKILL: that is the crash restart the guard exists to prevent. The
            # kernel remains the last resort.
            self._cool_down(now_ns)

    # --- deciding ------------------------------------------------------------------------

    def _decide(self, event_ns: int) -> None:
        sample = self._read()
        if sample is None or sample.limit_bytes is None:
            return
        threshold = self.settings.threshold_bytes(sample.limit_bytes)
        if sample.working_set_bytes < threshold:
            # Page cache, or a v1 threshold crossed on the way down: not pressure.
            self._no_victim_logged = False
            return
        floor = max(
            self.settings.floor_bytes,
            int(sample.limit_bytes * self.settings.victim_share_pct / 100.0),
        )
        candidate = choose(self._children(), floor)
        if candidate is None:
            self.counters.no_victim += 1
            if not self._no_victim_logged:
                self._no_victim_logged = True
                logger.warning(
                    "guard: {} at {:.0f} of {:.0f} MiB (working set), no client backend of "
                    "postmaster {} holds more than {:.0f} MiB: nothing the guard may stop",
                    self.group_name,
                    sample.working_set_bytes / MIB,
                    sample.limit_bytes / MIB,
                    self.postmaster_pid,
                    floor / MIB,
                )
            return
        # An idle session's memory is the session's: a cancel would only cost the grace.
        first = signal.SIGTERM if candidate.idle else signal.SIGINT
        self._signal(candidate, first, event_ns, sample)

    def _signal(
        self, candidate: Candidate, signum: signal.Signals, event_ns: int, sample: Sample
    ) -> None:
        now_ns = self._clock_ns()
        act = _Act(
            candidate, signum, event_ns, now_ns, sample, now_ns / 1e9 + self.settings.grace_s
        )
        if self.settings.dry_run:
            self._finish(act, DRY_RUN, now_ns, sample)
            self._cool_down(now_ns)
            return
        sent = self._send(candidate.pid, candidate.start_ticks, signum)
        act = _Act(candidate, signum, event_ns, self._clock_ns(), sample, act.grace_until_s)
        if sent is Sent.SENT:
            self._act = act
            self.state = ACTING
            self._next_check_s = act.signal_ns / 1e9 + self.settings.check_interval_s
            return
        if sent is Sent.DENIED:
            self._finish(act, DENIED, now_ns, sample)
            logger.error(
                "guard: not allowed to signal backend pid {}: give pgoom CAP_KILL or run it as "
                "the PostgreSQL user (docs/guard.md, Privileges)",
                candidate.pid,
            )
            self._cool_down(now_ns)
            return
        # GONE: the query ended or the session closed on its own since it was chosen. Decide
        # again from a fresh reading: the next-largest may be the one still growing.
        self._finish(act, GONE, now_ns, sample)
        self.state = WATCHING
        self._act = None
        if signum == signal.SIGINT:
            self._decide(event_ns)
        else:
            self._cool_down(now_ns)

    def _finish(self, act: _Act, outcome: str, now_ns: int, sample: Optional[Sample]) -> None:
        """One log line and one report per signal, once its outcome is known."""
        counters = self.counters.actions
        key = (act.signum.name if outcome != DRY_RUN else "none", outcome)
        counters[key] = counters.get(key, 0) + 1
        relief_ms = (now_ns - act.signal_ns) / 1e6 if outcome == RELIEVED else None
        decided = act.sample
        fields: dict[str, Any] = {
            "postmaster": self.postmaster_pid,
            "group": self.group_name,
            "pid": act.candidate.pid,
            "title": act.candidate.title,
            "private_bytes": act.candidate.private_bytes,
            "parallel_workers": act.candidate.workers,
            "working_set_bytes": decided.working_set_bytes,
            "limit_bytes": decided.limit_bytes,
            "signal": act.signum.name,
            "outcome": outcome,
            "event_to_signal_us": (act.signal_ns - act.event_ns) // 1000,
            "relief_ms": relief_ms,
            "working_set_after_bytes": sample.working_set_bytes if sample else None,
        }
        self.last_action = fields
        verb = "would send" if outcome == DRY_RUN else "sent"
        after = {
            RELIEVED: f"relieved in {relief_ms:.1f} ms" if relief_ms is not None else "relieved",
            NO_RELIEF: f"no relief within {self.settings.grace_s:g} s",
            GONE: "the backend was gone before the signal",
            DENIED: "permission denied",
            DRY_RUN: "dry run",
        }[outcome]
        logger.bind(**fields).log(
            "INFO" if outcome in (RELIEVED, DRY_RUN) else "WARNING",
            'guard: {} {} to client backend pid={} title="{}" private_mib={:.1f} '
            "working_set_mib={:.1f} limit_mib={:.1f} postmaster={} group={} "
            "event_to_signal_us={}: {}",
            verb,
            act.signum.name,
            act.candidate.pid,
            act.candidate.title,
            act.candidate.private_bytes / MIB,
            decided.working_set_bytes / MIB,
            (decided.limit_bytes or 0) / MIB,
            self.postmaster_pid,
            self.group_name,
            fields["event_to_signal_us"],
            after,
        )
        self._report("guard_action", fields)

    def _kernel_oom(self) -> None:
        self.counters.kernel_oom_events += 1
        logger.warning(
            "guard: the kernel's OOM killer ran in {} (postmaster {}, guard state {})",
            self.group_name,
            self.postmaster_pid,
            self.state,
        )

    def _cool_down(self, now_ns: int) -> None:
        self.state = COOLDOWN
        self._act = None
        self._next_check_s = None
        self._cooldown_until_s = now_ns / 1e9 + self.settings.cooldown_s

    def _relieved(self, sample: Optional[Sample]) -> bool:
        return (
            sample is not None
            and sample.limit_bytes is not None
            and sample.working_set_bytes < self.settings.relief_bytes(sample.limit_bytes)
        )

    def _read(self) -> Optional[Sample]:
        try:
            sample = self._sample()
        except OSError as err:
            logger.debug("guard: cannot read {}: {}", self.group_name, err)
            return None
        self.last_sample = sample
        return sample

    # --- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        sample = self.last_sample
        return {
            "postmaster": self.postmaster_pid,
            "group": self.group_name,
            "state": self.state,
            "dry_run": self.settings.dry_run,
            "threshold_pct": self.settings.threshold_pct,
            "working_set_bytes": sample.working_set_bytes if sample else None,
            "limit_bytes": sample.limit_bytes if sample else None,
            "pressure_events": sum(self.counters.pressure_events.values()),
            "actions": sum(self.counters.actions.values()),
            "kernel_oom_events": self.counters.kernel_oom_events,
            "last_action": self.last_action,
        }
