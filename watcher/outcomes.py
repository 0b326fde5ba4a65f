"""The log of what the engine did, as a listener of its notices (watcher.events).

A condition of one process (refused, denied, already protected) is logged once at its level
and then at debug: an EACCES retried every verify tick must not flood the log.
"""

from __future__ import annotations

from typing import Any

from loguru import logger

from watcher.events import (
    Adjusted,
    ChildAdjusted,
    ChildOffMinus1000,
    Exited,
    Failed,
    GroupKillNote,
    Kept,
    Notice,
    Refused,
)

_REMEMBERED = 10000  # (pid, start, condition) markers kept before forgetting them all


class OutcomeLog:
    def __init__(self) -> None:
        self._reported: set[tuple[int, int, str]] = set()

    def __call__(self, notice: Notice) -> None:
        if isinstance(notice, Adjusted):
            self._adjusted(notice)
        elif isinstance(notice, Kept):
            if notice.dry_run:
                self._log_once(
                    notice.pid,
                    notice.start,
                    "dry-run",
                    "info",
                    "dry run: would set postmaster pid={} data_dir={} oom_score_adj {} -> {}",
                    notice.pid,
                    notice.data_dir,
                    notice.old,
                    notice.target,
                )
            else:
                self._log_once(
                    notice.pid,
                    notice.start,
                    "unchanged",
                    "info",
                    "postmaster pid={} data_dir={} already at oom_score_adj {} (target {})",
                    notice.pid,
                    notice.data_dir,
                    notice.old,
                    notice.target,
                )
        elif isinstance(notice, Refused):
            self._log_once(
                notice.pid,
                notice.start,
                notice.reason,
                "info",
                "not protecting pid {} ({}): {}",
                notice.pid,
                notice.cmdline,
                notice.reason,
            )
        elif isinstance(notice, Failed):
            self._log_once(notice.pid, notice.start, "denied", "error", "{}", notice.message)
        elif isinstance(notice, ChildAdjusted):
            if notice.denied:
                self._log_once(notice.pid, notice.start, "denied", "warning", "{}", notice.denied)
            else:
                logger.debug(
                    "child pid={} of postmaster {}: oom_score_adj {} -> {}",
                    notice.pid,
                    notice.parent,
                    notice.old,
                    notice.new,
                )
        elif isinstance(notice, GroupKillNote):
            self._log_once(notice.pid, notice.start, notice.key, notice.level, "{}", notice.message)
        elif isinstance(notice, ChildOffMinus1000):
            logger.warning(
                "child pid={} of postmaster {} was at -1000: set to {} (no child may stay "
                "unkillable beside a postmaster at -1000)",
                notice.pid,
                notice.parent,
                notice.new,
            )
        elif isinstance(notice, Exited):
            logger.info("postmaster pid={} data_dir={} exited", notice.pid, notice.data_dir)

    @staticmethod
    def _adjusted(notice: Adjusted) -> None:
        if notice.method == "drift":
            logger.warning(
                "drift repaired: postmaster pid={} data_dir={} had oom_score_adj {}, set "
                "back to {}",
                notice.pid,
                notice.data_dir,
                notice.old,
                notice.new,
            )
            return
        fields = dict(
            pid=notice.pid,
            data_dir=notice.data_dir,
            old=notice.old,
            new=notice.new,
            source=notice.source,
            latency_us=notice.latency_us,
            method=notice.method,
        )
        logger.bind(**fields).info(
            "protected postmaster pid={} data_dir={} oom_score_adj {} -> {} source={} "
            "latency_us={}",
            notice.pid,
            notice.data_dir,
            notice.old,
            notice.new,
            notice.source,
            notice.latency_us if notice.latency_us is not None else "-",
        )

    def _log_once(
        self, pid: int, start: int, key: str, level: str, message: str, *args: Any
    ) -> None:
        marker = (pid, start, key)
        if marker in self._reported:
            logger.debug(message, *args)
            return
        self._reported.add(marker)
        if len(self._reported) > _REMEMBERED:
            self._reported.clear()
        logger.log(level.upper(), message, *args)
