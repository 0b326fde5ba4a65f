"""Prometheus metrics for `pgoom watch --metrics-address HOST:PORT` (off by default).

Totals the engine already keeps (events, adjustments, failures, protected postmasters, the
source's own counters) are read at scrape time, so they cannot drift from the engine's
truth; what needs a label or a distribution (rescans by reason, exec→protected latency)
is recorded from the engine's listener events. The HTTP server is prometheus_client's,
on a daemon thread: a scrape never blocks the engine's loop. docs/metrics.md lists every
metric; keep the two in step.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from watcher import __version__
from watcher.errors import UsageError
from watcher.events import Adjusted, Exited, Notice, Ready, Rescanned
from watcher.limits import GROUP_KILL_POLICIES
from watcher.parse import parse_address

if TYPE_CHECKING:
    from watcher.engine import Engine

# exec → oom_score_adj written: netlink measured p50 ~0.1 ms, inotify should stay under
# 5 ms; the long tail goes up to the poll source's interval (30 s by default).
LATENCY_BUCKETS_S = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
    5.0,
    30.0,
)
SOURCES = ("netlink", "inotify", "poll")
# Source stats that mean "the kernel dropped events" (ENOBUFS on the netlink socket,
# IN_Q_OVERFLOW on inotify), whichever name a source uses for them.
LOST_STAT_KEYS = ("enobufs", "lost", "overflows")


def _yes_no(value: Optional[bool]) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


class EngineCollector(Collector):
    """Reads the engine's counters when Prometheus scrapes."""

    def __init__(self) -> None:
        self.engine: Optional[Engine] = None  # set once the source is subscribed

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        if engine is None:
            return
        counters = engine.counters
        source_name = engine.source.name
        events = CounterMetricFamily(
            "pgoom_events_received", "Events the engine received from its source."
        )
        events.add_metric([], counters.events)
        yield events

        adjustments = CounterMetricFamily(
            "pgoom_adjustments",
            "oom_score_adj writes to postmasters: kind=protect on discovery, kind=drift when "
            "a protected postmaster's score had been changed and was set back.",
            labels=["kind"],
        )
        adjustments.add_metric(["protect"], counters.adjustments)
        adjustments.add_metric(["drift"], counters.drift_repairs)
        yield adjustments

        failures = CounterMetricFamily(
            "pgoom_failures",
            "Postmasters that could not be protected, by reason (denied: the kernel refused "
            "the write, e.g. no CAP_SYS_RESOURCE).",
            labels=["reason"],
        )
        known = dict(counters.failures)
        known.setdefault("denied", 0)
        for reason, count in sorted(known.items()):
            failures.add_metric([reason], count)
        yield failures

        protected = GaugeMetricFamily(
            "pgoom_protected_postmasters",
            "Postmasters pgoom watches now (score_ok=false: the kernel refuses the target).",
            labels=["score_ok"],
        )
        entries = list(engine.protected.values())
        ok = sum(1 for p in entries if p.score_ok)
        protected.add_metric(["true"], ok)
        protected.add_metric(["false"], len(entries) - ok)
        yield protected

        policy = GaugeMetricFamily(
            "pgoom_group_kill_policy",
            "1 for the --group-kill policy in force (auto, ungroup, keep).",
            labels=["policy"],
        )
        in_force = engine.settings.group_kill.value
        for name in GROUP_KILL_POLICIES:
            policy.add_metric([name], 1 if name == in_force else 0)
        yield policy

        effective = GaugeMetricFamily(
            "pgoom_protected_postmasters_group_kill",
            "Protected postmasters by whether their memory cgroup kills as a group "
            "(group_kill) and whether their score in force survives that (survives): "
            "survives=no is a postmaster at its score that still dies in an OOM.",
            labels=["group_kill", "survives"],
        )
        tally: dict[tuple[str, str], int] = {}
        for entry in entries:
            pair = (_yes_no(entry.group_kill), _yes_no(entry.survives_group_kill))
            tally[pair] = tally.get(pair, 0) + 1
        for (group_text, survives_text), count in sorted(tally.items()):
            effective.add_metric([group_text, survives_text], count)
        yield effective

        kept_off = CounterMetricFamily(
            "pgoom_children_off_minus_1000",
            "Children found at -1000 beside a postmaster at -1000 and moved to the children "
            "score (a child there would be unkillable).",
        )
        kept_off.add_metric([], counters.children_off_minus_1000)
        yield kept_off

        active = GaugeMetricFamily(
            "pgoom_source_active", "1 for the event source in use.", labels=["source"]
        )
        for name in SOURCES:
            active.add_metric([name], 1 if name == source_name else 0)
        yield active

        try:
            stats = dict(engine.source.stats())
        except Exception:  # a scrape must not fail because a source is mid-close
            stats = {}
        lost = CounterMetricFamily(
            "pgoom_lost_events",
            "Times the kernel dropped events because pgoom's queue was full (netlink "
            "ENOBUFS): each one triggers a rescan of /proc.",
        )
        lost.add_metric([], sum(int(stats.get(k, 0)) for k in LOST_STAT_KEYS))
        yield lost

        raw = GaugeMetricFamily(
            "pgoom_source_stat",
            "The active source's own counters, as it reports them.",
            labels=["source", "stat"],
        )
        for key, value in sorted(stats.items()):
            if isinstance(value, (int, float)):
                raw.add_metric([source_name, str(key)], value)
        yield raw


# The guard: pressure event -> signal measured ~1 ms, signal -> relief ~5 ms; a session
# that keeps its memory takes the whole grace (1 s by default).
RELIEF_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class GuardCollector(Collector):
    """Reads `--guard`'s totals (watcher.guard.Totals) when Prometheus scrapes."""

    def __init__(self) -> None:
        self.guards: Any = None  # watcher.guard.Guards, set by attach_guard

    def collect(self) -> Iterator[Metric]:
        guards = self.guards
        if guards is None:
            return
        totals = guards.totals
        pressure = CounterMetricFamily(
            "pgoom_guard_pressure_events",
            "Wakeups of the guard by the kernel's pressure notifications, by signal "
            "(threshold, vmpressure, oom: cgroup v1; psi, events: cgroup v2 and the host).",
            labels=["signal"],
        )
        for name, count in sorted(totals.pressure_events.items()):
            pressure.add_metric([name], count)
        yield pressure
        actions = CounterMetricFamily(
            "pgoom_guard_actions",
            "Signals the guard sent (signal=none: dry run), by outcome (relieved, not_enough, "
            "no_relief, gone, denied, dry_run).",
            labels=["signal", "outcome"],
        )
        for (signal_name, outcome), count in sorted(totals.actions.items()):
            actions.add_metric([signal_name, outcome], count)
        yield actions
        ooms = CounterMetricFamily(
            "pgoom_guard_kernel_oom_events",
            "Times the kernel's OOM killer ran in a guarded group (cgroup v1 oom_control).",
        )
        ooms.add_metric([], totals.kernel_oom_events)
        yield ooms
        state = GaugeMetricFamily(
            "pgoom_guard_postmasters", "Postmasters the guard watches, by state.", labels=["state"]
        )
        states = [row["state"] for row in guards.status()]
        for name in ("watching", "acting", "cooldown"):
            state.add_metric([name], states.count(name))
        yield state


class Metrics:
    """The registry, the listener that feeds it, and the HTTP server."""

    def __init__(self) -> None:
        self.collector = EngineCollector()
        self.guard_collector = GuardCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.registry.register(self.guard_collector)
        self.ready = Gauge(
            "pgoom_ready",
            "1 once pgoom is subscribed and has scanned /proc once.",
            registry=self.registry,
        )
        self.rescans = Counter(
            "pgoom_rescans",
            "Full scans of /proc after possible event loss or a source's request, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "pgoom_protect_latency_seconds",
            "From the event that revealed a postmaster (its exec, or its postmaster.pid "
            "write) to its oom_score_adj written.",
            ["source"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.exits = Counter(
            "pgoom_postmaster_exits",
            "Protected postmasters seen to exit.",
            registry=self.registry,
        )
        self.guard_relief = Histogram(
            "pgoom_guard_relief_seconds",
            "From the guard's signal to the working set back below the relief level.",
            ["signal"],
            buckets=RELIEF_BUCKETS_S,
            registry=self.registry,
        )
        self.guard_reaction = Histogram(
            "pgoom_guard_reaction_seconds",
            "From the pressure notification's wakeup to the guard's signal.",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        info = Gauge("pgoom_build_info", "pgoom's version.", ["version"], registry=self.registry)
        info.labels(__version__).set(1)
        self._server: Any = None
        self.bound: Optional[tuple[str, int]] = None

    def __call__(self, notice: Notice) -> None:
        """An Engine listener (watcher.events)."""
        if isinstance(notice, Ready):
            self.ready.set(1)
        elif isinstance(notice, Rescanned):
            self.rescans.labels(notice.reason).inc()
        elif isinstance(notice, Adjusted):
            if notice.latency_us is not None:
                self.latency.labels(notice.source).observe(notice.latency_us / 1e6)
        elif isinstance(notice, Exited):
            self.exits.inc()

    def serve(self, address: str) -> tuple[str, int]:
        """Listen on `address`; returns the bound (host, port) (port 0 picks a free one)."""
        try:
            host, port = parse_address(address)
        except ValueError as err:
            raise UsageError(f"--metrics-address {err}") from None
        try:
            self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except (OSError, socket.gaierror) as err:
            reason = err.strerror or str(err)
            raise UsageError(f"--metrics-address {address}: cannot listen: {reason}") from None
        bound = self._server.server_address
        self.bound = (host, int(bound[1]))
        return self.bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def attach(self, engine: Engine) -> None:
        """Follow `engine`: its notices, and its counters at every scrape."""
        engine.listeners.append(self)
        self.collector.engine = engine

    def attach_guard(self, guards: Any) -> None:
        """Follow `--guard`'s watcher.guard.Guards: its totals at scrape, each action's
        timings as it is reported."""
        self.guard_collector.guards = guards
        guards.reports.append(self.on_guard_report)

    def on_guard_report(self, name: str, fields: dict[str, Any]) -> None:
        if name != "guard_action" or fields.get("outcome") == "dry_run":
            return
        self.guard_reaction.observe(fields["event_to_signal_us"] / 1e6)
        if fields.get("relief_ms") is not None:
            self.guard_relief.labels(fields["signal"]).observe(fields["relief_ms"] / 1000)


def start(address: str) -> Metrics:
    """Listen first, before the source is subscribed: a bad or busy address is reported
    before anything else happens."""
    metrics = Metrics()
    metrics.serve(address)
    return metrics
