"""`pgoom watch`: set up logging, choose and open the source, run the engine."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

from loguru import logger

from watcher import sdnotify
from watcher.config import Settings
from watcher.discover import discover
from watcher.engine import Engine
from watcher.errors import PgoomError
from watcher.logs import setup_logging
from watcher.procfs import ProcFS
from watcher.sources.choose import open_source


def discover_data_dirs(settings: Settings, procfs: ProcFS) -> list[str]:
    """Data directories of verified postmasters running now (for inotify without
    --data-dir)."""
    found: list[str] = []
    for finding in discover(procfs, settings.rules, fallback=False):
        data_dir = finding.facts.data_dir
        if finding.protectable and data_dir and data_dir not in found:
            found.append(data_dir)
    return found


def build_engine(settings: Settings) -> Engine:
    procfs = ProcFS(settings.proc_root)
    source = open_source(settings, lambda: discover_data_dirs(settings, procfs))
    return Engine(settings, source, procfs)


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


def run_watch(
    settings: Settings, metrics_address: Optional[str] = None, notes: Sequence[str] = ()
) -> None:
    """Log, subscribe, attach the listeners (systemd notification, metrics), run until
    SIGTERM/SIGINT. Listeners are attached before the first scan, so READY=1 and the
    metrics see everything from the start."""
    setup_logging(settings.log_file, settings.log_json, settings.log_level)
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
        if notifier.enabled:
            engine.listeners.append(notifier)
        if metrics is not None:
            metrics.attach(engine)
        engine.run()
    except PgoomError as err:
        notifier.failed(str(err))
        raise
    finally:
        notifier.stopping()
        notifier.close()
        if metrics is not None:
            metrics.close()
