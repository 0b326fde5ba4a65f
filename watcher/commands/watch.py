"""`pgoom watch`: set up logging, choose and open the source, run the engine."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Optional

from loguru import logger

from watcher import sdnotify
from watcher.config import GuardOptions, Settings
from watcher.discover import discover
from watcher.engine import Engine
from watcher.errors import PgoomError
from watcher.guard import Guards, GuardSettings
from watcher.guard.state import STATE_DIR
from watcher.logs import SafeFileSink, setup_logging
from watcher.procfs import ProcFS
from watcher.sources.choose import open_source


def discover_data_dirs(settings: Settings, procfs: ProcFS) -> list[str]:
    """Data directories of verified postmasters running now (for inotify without
    --data-dir)."""
    found: list[str] = []
    for finding in discover(procfs, settings.rules, False, settings.trusted_binaries):
        data_dir = finding.facts.data_dir
        if finding.protectable and data_dir and data_dir not in found:
            found.append(data_dir)
    return found


def build_engine(settings: Settings) -> Engine:
    procfs = ProcFS(settings.proc_root)
    source = open_source(settings, lambda: discover_data_dirs(settings, procfs))
    engine = Engine(settings, source, procfs)
    if settings.guard is not None:
        attach_guard(engine, settings.guard, procfs)
    return engine


def attach_guard(engine: Engine, options: GuardOptions, procfs: ProcFS) -> Guards:
    """--guard: the guard hears of every protected postmaster through the engine's notices
    and shares the engine's loop through one fd (watcher.guard)."""
    guards = Guards(
        GuardSettings(
            threshold_pct=options.threshold_pct,
            grace_s=options.grace_s,
            cooldown_s=options.cooldown_s,
            floor_bytes=options.floor_mb << 20,
            dry_run=options.dry_run,
        ),
        procfs,
        state_dir=STATE_DIR,
    )
    engine.listeners.append(guards.on_notice)
    engine.attachments.append(guards)
    engine.guards = guards
    logger.info(
        "guard on{}: acts at {:g}% of a memory limit, grace {:g} s, cooldown {:g} s, floor {} MiB",
        " (dry run)" if options.dry_run else "",
        options.threshold_pct,
        options.grace_s,
        options.cooldown_s,
        options.floor_mb,
    )
    return guards


def use_realtime_priority() -> None:
    """SCHED_FIFO at the lowest real-time priority. Measured on 2 CPUs (docs/benchmarks.md):
    exec -> protected p99 4.0 ms at nice 0 (4.6 ms at nice -10), 0.84-1.01 ms at SCHED_FIFO,
    because a starting postmaster and its launcher compete for the CPUs the watcher needs.
    The watcher blocks in the kernel between events, and the kernel's real-time throttling
    leaves other tasks their share even in a fork storm. Refused (no CAP_SYS_NICE, a
    container's cgroup without real-time budget): one warning, normal priority."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except OSError as err:
        logger.warning(
            "--realtime: SCHED_FIFO refused ({}): running at normal priority; grant "
            "CAP_SYS_NICE (systemd: CPUSchedulingPolicy=fifo) or drop --realtime",
            os.strerror(err.errno or 0),
        )
    else:
        logger.info("running at SCHED_FIFO priority 1 (--realtime)")


# What a re-read configuration can change in a running watcher; the rest (the source and
# its buffer, the log file and format, the /proc root, real-time priority, metrics) is
# fixed when the watcher starts.
LIVE_FIELDS = (
    "rules",
    "data_dirs",
    "interval_s",
    "verify_interval_s",
    "dry_run",
    "fallback",
    "trusted_binaries",
)


def changes(old: Settings, new: Settings) -> tuple[list[str], list[str]]:
    """(what changed and takes effect now, what changed and needs a restart), for the log."""
    live: list[str] = []
    later: list[str] = []
    for field in dataclasses.fields(Settings):
        before, after = getattr(old, field.name), getattr(new, field.name)
        if before == after:
            continue
        if field.name == "rules":
            text = "rules: " + "; ".join(f"{r.name} at {r.score}" for r in after)
        else:
            text = f"{field.name}: {before!r} -> {after!r}"
        (live if field.name in LIVE_FIELDS else later).append(text)
    return live, later


def hangup_handler(
    settings: Settings, sink: Optional[SafeFileSink], reread: Optional[Callable[[], Settings]]
) -> Callable[[], Optional[Settings]]:
    """SIGHUP, as daemons do it: reopen the log file (after logrotate moved it), re-read the
    configuration file and say what changed. A configuration that no longer parses keeps
    the running one, with the error."""
    current = settings

    def on_hangup() -> Optional[Settings]:
        nonlocal current
        if sink is not None:
            sink.reopen()
        logger.info("SIGHUP: log file reopened" if sink is not None else "SIGHUP received")
        if reread is None:
            return None
        try:
            new = reread()
        except PgoomError as err:
            logger.warning("SIGHUP: configuration not re-read, keeping the running one: {}", err)
            return None
        live, later = changes(current, new)
        if not live and not later:
            logger.info("SIGHUP: configuration re-read, nothing changed")
            return None
        for text in live:
            logger.info("SIGHUP: configuration changed: {}", text)
        for text in later:
            logger.warning("SIGHUP: {} changed, takes effect at the next start", text)
        current = dataclasses.replace(current, **{name: getattr(new, name) for name in LIVE_FIELDS})
        return current

    return on_hangup


def run_watch(
    settings: Settings,
    metrics_address: Optional[str] = None,
    notes: Sequence[str] = (),
    reread: Optional[Callable[[], Settings]] = None,
) -> None:
    """Log, subscribe, attach the listeners (systemd notification, metrics), run until
    SIGTERM/SIGINT. Listeners are attached before the first scan, so READY=1 and the
    metrics see everything from the start. SIGHUP: hangup_handler."""
    sink = setup_logging(settings.log_file, settings.log_json, settings.log_level)
    for note in notes:
        logger.info("{}", note)
    if settings.dry_run:
        logger.info("dry run: nothing will be written")
    if settings.realtime:
        use_realtime_priority()
    notifier = sdnotify.Notifier()
    metrics = None
    try:
        if metrics_address:
            from watcher import metrics as metrics_module

            metrics = metrics_module.start(metrics_address)
            host, port = metrics.bound or ("", 0)
            shown = f"[{host}]" if ":" in host else host
            logger.info("metrics on http://{}:{}/metrics", shown, port)
        engine = build_engine(settings)
        engine.on_hangup = hangup_handler(settings, sink, reread)
        if notifier.enabled:
            engine.listeners.append(notifier)
        if metrics is not None:
            metrics.attach(engine)
            if engine.guards is not None:
                metrics.attach_guard(engine.guards)
        try:
            engine.run()
        finally:
            if isinstance(engine.guards, Guards):
                engine.guards.close()
    except PgoomError as err:
        notifier.failed(str(err))
        raise
    finally:
        notifier.stopping()
        notifier.close()
        if metrics is not None:
            metrics.close()
