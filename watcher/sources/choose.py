"""Choose the event source: the one asked for, or with `auto` the best that works here,
logged in one line with the reason."""

from __future__ import annotations

from collections.abc import Callable

from loguru import logger

from watcher.config import Settings
from watcher.errors import SourceUnavailable
from watcher.groupkill import Policy
from watcher.limits import OOM_SCORE_ADJ_MIN
from watcher.sources.base import Source


def wants_children(settings: Settings) -> bool:
    """Fork events are needed where a postmaster's children may have to be moved: a rule
    with a children score, a rule at -1000, or the group-kill policy auto (which puts a
    postmaster at -1000 where its cgroup kills as a group, and must then keep every new
    child off -1000 within a fork event, not a verify tick later)."""
    return settings.group_kill is Policy.AUTO or any(
        r.children_score is not None or r.score == OOM_SCORE_ADJ_MIN for r in settings.rules
    )


def make_source(name: str, settings: Settings, data_dirs: list[str]) -> Source:
    if name == "netlink":
        from watcher.sources.netlink import NetlinkSource

        return NetlinkSource(
            rcvbuf_bytes=settings.rcvbuf_bytes,
            ack_timeout_s=settings.ack_timeout_s,
            want_forks=wants_children(settings),
        )
    if name == "inotify":
        from watcher.sources.inotify import InotifySource

        return InotifySource(data_dirs)
    if name == "poll":
        from watcher.sources.poll import PollSource

        return PollSource(settings.interval_s, settings.proc_root)
    raise SourceUnavailable(f"unknown source {name}")


def open_source(settings: Settings, discover: Callable[[], list[str]]) -> Source:
    """Open (subscribe) the source. `discover()` lists the data directories of postmasters
    already running, which make inotify usable without --data-dir; it costs a scan, so it
    runs only when netlink is out."""
    dirs = list(settings.data_dirs)
    if settings.source == "inotify":
        dirs = list(dict.fromkeys([*dirs, *discover()]))
    if settings.source != "auto":
        source = make_source(settings.source, settings, dirs)
        source.open()
        logger.info("source: {} (asked for)", source.name)
        return source
    try:
        source = make_source("netlink", settings, dirs)
        source.open()
    except SourceUnavailable as err:
        why = str(err)
    else:
        logger.info("source: netlink (proc connector subscribed and acknowledged)")
        return source
    dirs = list(dict.fromkeys([*dirs, *discover()]))
    if dirs:
        source = make_source("inotify", settings, dirs)
        try:
            source.open()
        except SourceUnavailable as err:
            why += f"; inotify unavailable: {err}"
        else:
            logger.info("source: inotify on {} (netlink unavailable: {})", ", ".join(dirs), why)
            return source
    source = make_source("poll", settings, dirs)
    source.open()
    logger.info(
        "source: poll every {:g} s (netlink unavailable: {}{})",
        settings.interval_s,
        why,
        "" if dirs else "; no data directory known for inotify, give --data-dir",
    )
    return source
