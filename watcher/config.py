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
    DEFAULT_GUARD_COOLDOWN_S,
    DEFAULT_GUARD_FLOOR_MB,
    DEFAULT_GUARD_GRACE_S,
    DEFAULT_GUARD_THRESHOLD_PCT,
    DEFAULT_INTERVAL_S,
    DEFAULT_LOG_FILE,
    DEFAULT_RCVBUF_BYTES,
    DEFAULT_VERIFY_INTERVAL_S,
    GROUP_KILL,
    GUARD_COOLDOWN,
    GUARD_FLOOR_MB,
    GUARD_GRACE,
    GUARD_THRESHOLD_PCT,
    INTERVAL,
    LOG_LEVEL,
    PATTERN,
    RCVBUF,
    SCORE,
    SOURCE,
    TRUSTED_BINARY,
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
    # Server binaries trusted although root does not own their path (watcher.binary).
    trusted_binaries: tuple[str, ...] = ()
    cgroup_root: str = ""  # prefixes the cgroup mount points (unit tests: a fake cgroupfs)
    guard: Optional[GuardOptions] = None  # None: the guard is off


@dataclass(frozen=True)
class GuardOptions:
    """`--guard`'s settings, checked (watcher.guard.GuardSettings is built from them)."""

    dry_run: bool = False
    threshold_pct: float = DEFAULT_GUARD_THRESHOLD_PCT
    grace_s: float = DEFAULT_GUARD_GRACE_S
    cooldown_s: float = DEFAULT_GUARD_COOLDOWN_S
    floor_mb: int = DEFAULT_GUARD_FLOOR_MB


def guard_options(
    guard: bool,
    dry_run: bool = False,
    threshold_pct: float = DEFAULT_GUARD_THRESHOLD_PCT,
    grace_s: float = DEFAULT_GUARD_GRACE_S,
    cooldown_s: float = DEFAULT_GUARD_COOLDOWN_S,
    floor_mb: int = DEFAULT_GUARD_FLOOR_MB,
) -> Optional[GuardOptions]:
    """The guard's settings, each checked by its declaration; None when it is off."""
    GUARD_THRESHOLD_PCT.validate(threshold_pct)
    GUARD_GRACE.validate(grace_s)
    GUARD_COOLDOWN.validate(cooldown_s)
    GUARD_FLOOR_MB.validate(floor_mb)
    if not (guard or dry_run):
        return None
    return GuardOptions(dry_run, float(threshold_pct), float(grace_s), float(cooldown_s), floor_mb)


def compile_pattern(text: str, where: str = PATTERN.flag) -> re.Pattern[str]:
    return re.compile(PATTERN.validate_item(text, where))


def check_data_dir(path: str, where: str = DATA_DIR.flag) -> str:
    DATA_DIR.validate_item(path, where)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{where} {path} exists but is not a directory")
    # Rules compare the postmaster's resolved data directory: resolve the operator's too
    # (a /pgdata/pg16 that is a symlink to the volume is the volume's path).
    return os.path.realpath(path)


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
    trusted_binaries: tuple[str, ...] = (),
    group_kill: str = DEFAULT_POLICY.value,
    cgroup_root: str = "",
    guard: Optional[GuardOptions] = None,
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
        trusted_binaries=tuple(TRUSTED_BINARY.validate(list(trusted_binaries)) or ()),
        group_kill=policy,
        cgroup_root=cgroup_root,
        guard=guard,
    )
