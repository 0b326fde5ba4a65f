"""Settings for the engine, validated once; the CLI (and the config file) build them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional

from watcher.errors import UsageError
from watcher.groupkill import DEFAULT_POLICY, Policy
from watcher.limits import DEFAULT_PATTERN, DEFAULT_SCORE
from watcher.match import Rule
from watcher.options import (
    CHILDREN_SCORE,
    DATA_DIR,
    DEFAULT_INTERVAL_S,
    DEFAULT_LOG_FILE,
    DEFAULT_RCVBUF_BYTES,
    DEFAULT_VERIFY_INTERVAL_S,
    GROUP_KILL,
    INTERVAL,
    LOG_LEVEL,
    PATTERN,
    RCVBUF,
    SCORE,
    SOURCE,
    VERIFY_INTERVAL,
)

DEFAULT_ACK_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class Settings:
    rules: list[Rule]
    data_dirs: list[str] = field(default_factory=list)
    source: str = "auto"
    interval_s: float = DEFAULT_INTERVAL_S
    verify_interval_s: float = DEFAULT_VERIFY_INTERVAL_S
    log_file: Optional[str] = DEFAULT_LOG_FILE
    log_json: bool = False
    log_level: str = "INFO"
    dry_run: bool = False
    # When no rule matches: the parent of other postgres processes, else the only one.
    fallback: bool = True
    rcvbuf_bytes: int = DEFAULT_RCVBUF_BYTES
    realtime: bool = False  # SCHED_FIFO: the exec -> protected tail is CPU contention
    group_kill: Policy = DEFAULT_POLICY  # what to do where the cgroup kills as a group
    ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S
    proc_root: str = "/proc"
    cgroup_root: str = ""  # prefixes the cgroup mount points (unit tests: a fake cgroupfs)


def compile_pattern(text: str, where: str = PATTERN.flag) -> re.Pattern[str]:
    return re.compile(PATTERN.validate_item(text, where))


def check_data_dir(path: str, where: str = DATA_DIR.flag) -> str:
    DATA_DIR.validate_item(path, where)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{where} {path} exists but is not a directory")
    return os.path.normpath(path)


def build_rules(
    patterns: list[str],
    data_dirs: list[str],
    score: int,
    children_score: Optional[int],
    match_all: bool = False,
) -> list[Rule]:
    """Patterns (the default one when none is given), then data directories, then, with
    --all, every verified postmaster."""
    SCORE.validate(score)
    CHILDREN_SCORE.validate(children_score)
    rules = [
        Rule(score=score, pattern=compile_pattern(p), children_score=children_score)
        for p in (patterns or [DEFAULT_PATTERN])
    ]
    rules += [Rule(score=score, data_dir=d, children_score=children_score) for d in data_dirs]
    if match_all:
        rules.append(Rule(score=score, children_score=children_score))
    return rules


def make_settings(
    patterns: Optional[list[str]] = None,
    data_dirs: Optional[list[str]] = None,
    score: int = DEFAULT_SCORE,
    children_score: Optional[int] = None,
    source: str = "auto",
    interval_s: float = DEFAULT_INTERVAL_S,
    verify_interval_s: float = DEFAULT_VERIFY_INTERVAL_S,
    match_all: bool = False,
    log_file: Optional[str] = DEFAULT_LOG_FILE,
    log_json: bool = False,
    log_level: str = "INFO",
    dry_run: bool = False,
    fallback: bool = True,
    rcvbuf_bytes: int = DEFAULT_RCVBUF_BYTES,
    realtime: bool = False,
    ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
    proc_root: str = "/proc",
    group_kill: str = DEFAULT_POLICY.value,
    cgroup_root: str = "",
) -> Settings:
    """Settings from values already taken from the command line, environment or file,
    each checked by its declaration in watcher.options."""
    source = SOURCE.validate(source).lower()
    INTERVAL.validate(interval_s)
    VERIFY_INTERVAL.validate(verify_interval_s)
    RCVBUF.validate(rcvbuf_bytes)
    log_level = LOG_LEVEL.validate(log_level).upper()
    policy = Policy(GROUP_KILL.validate(group_kill).strip().lower())
    dirs = [check_data_dir(d) for d in (data_dirs or [])]
    if source == "inotify" and not dirs:
        raise UsageError("--source inotify needs at least one --data-dir (e.g. /pgdata/pg16)")
    return Settings(
        rules=build_rules(list(patterns or []), dirs, score, children_score, match_all),
        data_dirs=dirs,
        source=source,
        interval_s=interval_s,
        verify_interval_s=verify_interval_s,
        log_file=log_file,
        log_json=log_json,
        log_level=log_level,
        dry_run=dry_run,
        fallback=fallback,
        rcvbuf_bytes=rcvbuf_bytes,
        realtime=realtime,
        ack_timeout_s=ack_timeout_s,
        proc_root=proc_root,
        group_kill=policy,
        cgroup_root=cgroup_root,
    )
