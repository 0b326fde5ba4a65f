"""One postmaster's guard: a pressure episode from the wakeup to relief, as a small state
machine driven by two calls, `on_pressure()` (the kernel woke us) and `on_timer()` (a
deadline the guard asked for passed). It reads through injected callables and signals
through one, so unit tests drive it with fake samples and a fake clock.

WATCHING  --pressure, working set >= threshold, a victim,
            the kernel's own choice is PostgreSQL-->          ACTING (SIGINT sent; SIGTERM
                                                              for an idle session)
ACTING    --working set < relief level, or < threshold
            with the victim's memory given back-->            WATCHING (outcome: relieved)
ACTING    --the victim gave its memory back, the working
            set is still >= threshold-->                      ACTING on the next victim
                                                              (outcome: not_enough), at most
                                                              max_victims in one episode
ACTING    --grace over, after SIGINT-->                       ACTING (SIGTERM sent)
ACTING    --grace over, after SIGTERM-->                      COOLDOWN (outcome: no relief)
COOLDOWN  --cooldown over, at the next pressure-->            WATCHING

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
from watcher.guard.victim import (
    Candidate,
    Child,
    Member,
    above_floor,
    candidates,
    fastest_growing,
    kernel_choice,
)

MIB = 1 << 20

WATCHING = "watching"
OBSERVING = "observing"  # the largest backend is idle: which running query is growing?
ACTING = "acting"
COOLDOWN = "cooldown"

# Outcomes of one signal, as counted in metrics and logged.
RELIEVED = "relieved"
NO_RELIEF = "no_relief"
GONE = "gone"
NOT_ENOUGH = "not_enough"  # the victim gave its memory back; the working set stayed high
DENIED = "denied"
DRY_RUN = "dry_run"

Report = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class GuardSettings:
    """Conservative defaults (docs/guard.md explains each)."""

    threshold_pct: float = 90.0  # act when the working set reaches this share of the limit
    grace_s: float = 1.0  # how long a signal has to bring the working set below the threshold
    cooldown_s: float = 10.0  # after an episode without relief, pressure is only counted
    # A backend with less private memory is never a victim. An idle PostgreSQL 15 backend
    # holds ~3 MiB (RssAnon, measured here): a 2 MB query stays below 6 MiB; the OOM
    # harness's many-backends sessions (their settings on top of those 3 MiB, 8.4 MiB
    # measured) are above it.
    floor_bytes: int = 6 * MIB
    dry_run: bool = False
    check_interval_s: float = 0.005  # while ACTING only: how often relief is checked
    # Relief is the working set back below the threshold by this share of the limit: a
    # cancel that gives back a few pages of executor memory while the session keeps the
    # rest (local buffers, caches) has not ended the episode.
    # A victim whose memory came back (it exited, or its private memory fell to this share
    # of what it held) relieves as soon as the working set is below the threshold itself.
    relief_margin_pct: float = 5.0
    released_fraction: float = 0.5
    release_settle_s: float = 0.02  # a released victim's pages, uncharged after its exit
    # Victims in one episode. When one victim's memory is back and the working set is still
    # above the threshold, many sessions share the blame (the OOM harness's many-backends:
    # ~50 sessions of 5-12 MiB each): the next-largest is stopped, up to this many, as long
    # as the kernel would still take a PostgreSQL process. Each costs at most one session;
    # the kernel's kill would cost all of them and a crash restart.
    max_victims: int = 3
    # When the largest backend is idle, its memory is not what is growing: the guard reads
    # the running queries twice, this far apart, and cancels the one growing fastest (by at
    # least min_growth_bytes), floor or not: that query is what pushed the group over the
    # threshold. Measured with the OOM harness's many-backends scenario: terminating the
    # largest idle session instead let the query in flight push the group over again 30 ms
    # later, and a second session was lost in 3 of 10 runs.
    observe_s: float = 0.02
    min_growth_bytes: int = 256 << 10

    def threshold_bytes(self, limit_bytes: int) -> int:
        return int(limit_bytes * self.threshold_pct / 100.0)

    def at_threshold(self, sample: Optional[Sample]) -> bool:
        """A reading of a limited group whose working set has reached the threshold."""
        return (
            sample is not None
            and sample.limit_bytes is not None
            and sample.working_set_bytes >= self.threshold_bytes(sample.limit_bytes)
        )

    def relief_bytes(self, limit_bytes: int) -> int:
        return int(limit_bytes * max(0.0, self.threshold_pct - self.relief_margin_pct) / 100.0)


@dataclass
class Counters:
    pressure_events: dict[str, int] = field(default_factory=dict)  # by signal
    actions: dict[tuple[str, str], int] = field(default_factory=dict)  # (signal, outcome)
    kernel_oom_events: int = 0
    no_victim: int = 0
    stood_aside: int = 0  # the kernel's choice was not PostgreSQL's: left to the kernel
    kill_under_way: int = 0  # a task of the group was dying: its memory was coming back


@dataclass
class _Observe:
    event_ns: int
    victims: int
    before: dict[int, int]  # running queries' private bytes at the first reading
    fallback: Optional[Candidate]  # the largest above the floor, if none is growing


@dataclass
class _Act:
    candidate: Candidate
    signum: signal.Signals
    event_ns: int  # when the wakeup that started the episode was received
    signal_ns: int
    sample: Sample  # the reading that decided it
    grace_until_s: float
    victims: int = 1  # this victim's place in its episode
    released_ns: Optional[int] = None  # when its memory was first seen given back


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
        members: Callable[[], list[Member]] = list,
        private_of: Optional[Callable[[int, int], Optional[int]]] = None,
        group_kill: Callable[[], bool] = lambda: False,
    ) -> None:
        """`members`: the processes of the memory group as the kernel's OOM killer weighs
        them ([] where unknown: the guard then acts as if the kernel would take PostgreSQL).
        `private_of(pid, start)`: a victim's private memory now, None once it is gone (None:
        relief only by the margin). `group_kill`: an OOM kill would take the whole group."""
        self.postmaster_pid = postmaster_pid
        self.group_name = group_name
        self._sample = sample
        self._children = children
        self._send = send
        self.settings = settings
        self._report = report or (lambda name, fields: None)
        self._clock_ns = clock_ns
        self._members = members
        self._private_of = private_of
        self._group_kill = group_kill
        self._episode_pids: set[int] = set()
        self.state = WATCHING
        self.counters = Counters()
        self.last_sample: Optional[Sample] = None
        self.last_action: Optional[dict[str, Any]] = None
        self._act: Optional[_Act] = None
        self._observe: Optional[_Observe] = None
        self._next_check_s: Optional[float] = None
        self._cooldown_until_s = 0.0
        self._quiet_logged = False  # "no victim" / "not PostgreSQL" said once per episode

    # --- the two entry points ------------------------------------------------------------

    def on_pressure(self, signal_name: str, event_ns: Optional[int] = None) -> None:
        event_ns = event_ns if event_ns is not None else self._clock_ns()
        events = self.counters.pressure_events
        events[signal_name] = events.get(signal_name, 0) + 1
        self._report("guard_pressure", {"postmaster": self.postmaster_pid, "signal": signal_name})
        if signal_name == "oom":
            self._kernel_oom()
            return
        if self.state in (ACTING, OBSERVING):
            return  # the timer is already checking
        now_s = event_ns / 1e9
        if self.state == COOLDOWN:
            if now_s < self._cooldown_until_s:
                return
            self.state = WATCHING
        self._episode_pids = set()
        self._decide(event_ns, 0)

    def on_sample(self, now_ns: int) -> None:
        """A reading the guard took itself (cgroup v2's paced sampler): pressure only if the
        working set is at the threshold, and then handled as a notification would be."""
        if self.state != WATCHING:
            return  # acting or observing reads on its own timer; cooldown only counts
        if self.settings.at_threshold(self._read()):
            self.on_pressure("sample", now_ns)

    def deadline_s(self) -> Optional[float]:
        """The monotonic time (s) the guard wants on_timer() called; None: no timer."""
        return self._next_check_s if self.state in (ACTING, OBSERVING) else None

    def on_timer(self) -> None:
        if self.state == OBSERVING:
            self._observed()
            return
        act = self._act
        if self.state != ACTING or act is None:
            self._next_check_s = None
            return
        now_ns = self._clock_ns()
        # The victim first, then the group: a working set read before the victim's exit
        # would still count the memory it is giving back.
        released = self._released(act)
        sample = self._read()
        if released and act.released_ns is None:
            act.released_ns = now_ns
        if self._relieved(sample, released, act):
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
        settled = act.released_ns is not None and (
            now_ns - act.released_ns >= self.settings.release_settle_s * 1e9
        )
        if released and not settled:
            # /proc shows a task without memory as soon as it has let go of its mm, a little
            # before the pages are uncharged: look again before calling it not enough.
            self._next_check_s = now_ns / 1e9 + self.settings.check_interval_s
            return
        if released:
            # The victim's memory is back and the working set is still high: it was one of
            # several. The next-largest, while the kernel would still take PostgreSQL.
            self._finish(act, NOT_ENOUGH, now_ns, sample)
            self._act = None
            self.state = WATCHING
            if act.victims < self.settings.max_victims:
                self._decide(act.event_ns, act.victims)
            if self.state != ACTING and self.settings.at_threshold(self.last_sample):
                self._cool_down(now_ns)  # no one left to stop, or not PostgreSQL's to stop
            return
        if now_ns / 1e9 < act.grace_until_s:
            self._next_check_s = now_ns / 1e9 + self.settings.check_interval_s
            return
        self._finish(act, NO_RELIEF, now_ns, sample)
        if act.signum == signal.SIGINT:
            # The cancel did not give the memory back (the backend ignored it, or what it
            # holds is the session's, not the query's): end the session, as a DBA would.
            self._signal(
                act.candidate, signal.SIGTERM, act.event_ns, sample or act.sample, act.victims
            )
        else:
            # Never SIGKILL: that is the crash restart the guard exists to prevent. The
            # kernel remains the last resort.
            self._cool_down(now_ns)

    # --- deciding ------------------------------------------------------------------------

    def _decide(self, event_ns: int, victims: int) -> None:
        """Choose and signal the next victim of this episode (`victims` so far), or say once
        why there is none."""
        sample = self._read()
        limit = None if sample is None else sample.limit_bytes
        if sample is None or limit is None or not self.settings.at_threshold(sample):
            # Page cache, or a v1 threshold crossed on the way down: not pressure.
            self._quiet_logged = False
            return
        children = self._children()
        # One ranking for both questions (the largest above the floor, the running ones).
        ranked = candidates([c for c in children if c.pid not in self._episode_pids])
        candidate = above_floor(ranked, self.settings.floor_bytes)
        # Running queries (not idle): one of them may be what is growing.
        running = {c.pid: c.private_bytes for c in ranked if not c.idle}
        if candidate is None and not running:
            self._no_victim(sample)
            return
        members = self._read_members()
        dying = next((m for m in members if m.dying), None)
        if dying is not None:
            # A kill is under way (the kernel's OOM killer's, most likely): its memory is
            # coming back, and the kernel itself chooses nobody until it is. Measured with
            # the harness's non-postgres hog: deciding meanwhile, on a group without the
            # dying hog, terminated an idle session in 10 of 20 runs.
            self.counters.kill_under_way += 1
            self._say_once(
                "guard: {} at {:.0f} of {:.0f} MiB (working set): pid {} is being killed, "
                "waiting for its memory to come back",
                self.group_name,
                sample.working_set_bytes / MIB,
                limit / MIB,
                dying.pid,
            )
            return
        chosen = kernel_choice(members, limit)
        postgres = {self.postmaster_pid, *(c.pid for c in children)}
        if chosen is not None and chosen.pid not in postgres and not self._group_kill():
            # An OOM kill here costs PostgreSQL nothing: stopping a session would only lose
            # it (measured with the harness's non-postgres hog: an idle session terminated,
            # and the kernel killed the hog anyway).
            self.counters.stood_aside += 1
            self._say_once(
                "guard: {} at {:.0f} of {:.0f} MiB (working set): the kernel's OOM killer "
                "would take pid {}, which is not PostgreSQL: left to the kernel",
                self.group_name,
                sample.working_set_bytes / MIB,
                limit / MIB,
                chosen.pid,
            )
            return
        # Reading the group took a while under pressure: decide on a reading taken after it.
        sample = self._read() or sample
        if not self.settings.at_threshold(sample):
            return
        if candidate is not None and not candidate.idle:
            self._signal(candidate, signal.SIGINT, event_ns, sample, victims + 1)
            return
        if not running:
            # An idle session's memory is the session's: a cancel would only cost the grace.
            assert candidate is not None
            self._signal(candidate, signal.SIGTERM, event_ns, sample, victims + 1)
            return
        # The largest is idle (or nobody is above the floor): an idle session's memory is
        # not what is growing. Find out which running query is before choosing.
        self._observe = _Observe(event_ns, victims, running, candidate)
        self.state = OBSERVING
        self._next_check_s = self._clock_ns() / 1e9 + self.settings.observe_s

    def _no_victim(self, sample: Sample) -> None:
        self.counters.no_victim += 1
        self._say_once(
            "guard: {} at {:.0f} of {:.0f} MiB (working set), no client backend of "
            "postmaster {} holds more than {:.0f} MiB and no running query is growing: "
            "nothing the guard may stop",
            self.group_name,
            sample.working_set_bytes / MIB,
            (sample.limit_bytes or 0) / MIB,
            self.postmaster_pid,
            self.settings.floor_bytes / MIB,
        )

    def _observed(self) -> None:
        """The second reading of an observation: cancel the query growing fastest, else
        terminate the largest idle session chosen at the first reading."""
        observe = self._observe
        self._observe = None
        self._next_check_s = None
        self.state = WATCHING
        if observe is None:
            return
        sample = self._read()
        if sample is None or not self.settings.at_threshold(sample):
            return  # it went away on its own (the query ended)
        children = [c for c in self._children() if c.pid not in self._episode_pids]
        grower = fastest_growing(observe.before, children, self.settings.min_growth_bytes)
        if grower is not None:
            self._signal(grower, signal.SIGINT, observe.event_ns, sample, observe.victims + 1)
            return
        fallback = observe.fallback
        if fallback is not None and any(c.pid == fallback.pid for c in children):
            self._signal(fallback, signal.SIGTERM, observe.event_ns, sample, observe.victims + 1)
            return
        self._no_victim(sample)

    def _read_members(self) -> list[Member]:
        try:
            return self._members()
        except OSError as err:
            logger.debug("guard: cannot list the tasks of {}: {}", self.group_name, err)
            return []

    def _say_once(self, message: str, *args: Any) -> None:
        if not self._quiet_logged:
            self._quiet_logged = True
            logger.warning(message, *args)

    def _signal(
        self,
        candidate: Candidate,
        signum: signal.Signals,
        event_ns: int,
        sample: Sample,
        victims: int,
    ) -> None:
        now_ns = self._clock_ns()
        self._episode_pids.add(candidate.pid)
        grace_until_s = now_ns / 1e9 + self.settings.grace_s
        act = _Act(candidate, signum, event_ns, now_ns, sample, grace_until_s, victims)
        if self.settings.dry_run:
            self._finish(act, DRY_RUN, now_ns, sample)
            self._cool_down(now_ns)
            return
        sent = self._send(candidate.pid, candidate.start_ticks, signum)
        act = _Act(candidate, signum, event_ns, self._clock_ns(), sample, grace_until_s, victims)
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
            self._decide(event_ns, victims - 1)
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
            NOT_ENOUGH: "its memory came back, the working set stayed above the threshold",
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

    def _released(self, act: _Act) -> bool:
        """The victim has given its memory back: it exited, or its private memory fell to
        `released_fraction` of what it held when chosen."""
        if self._private_of is None:
            return False
        try:
            now = self._private_of(act.candidate.pid, act.candidate.start_ticks)
        except OSError:
            return False
        if now is None:
            return True
        return now <= act.candidate.private_bytes * self.settings.released_fraction

    def _relieved(self, sample: Optional[Sample], released: bool, act: _Act) -> bool:
        """Below the relief level; or, once the victim's memory is back, below the threshold
        or down by at least half of what the victim held. Measured with the OOM harness's
        many-backends: the group read 276 MiB at the decision (the query in flight had
        finished above the 270 MiB threshold), an idle session of 7.4 MiB was terminated,
        and the group settled at 270.7 with nothing growing: a second session terminated
        for 0.7 MiB, 29 MiB below the limit, is a session lost for nothing. If memory keeps
        growing, the next crossing is a new episode."""
        if sample is None or sample.limit_bytes is None:
            return False
        limit = sample.limit_bytes
        if sample.working_set_bytes < self.settings.relief_bytes(limit):
            return True
        if not released:
            return False
        if sample.working_set_bytes < self.settings.threshold_bytes(limit):
            return True
        dropped = act.sample.working_set_bytes - sample.working_set_bytes
        return dropped >= act.candidate.private_bytes * self.settings.released_fraction

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
            "stood_aside": self.counters.stood_aside,
            "last_action": self.last_action,
        }
