"""Settings for the engine, validated once; the CLI (and the config file) build them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional

from watcher.errors import UsageError
from watcher.groupkill import DEFAULT_POLICY, Policy, parse_policy
from watcher.match import DEFAULT_PATTERN, DEFAULT_SCORE, Rule, validate_score

SOURCES = ("auto", "netlink", "inotify", "poll")
DEFAULT_LOG_FILE = "/tmp/postgres-oom-adjuster.log"
DEFAULT_INTERVAL_S = 30.0  # the seed's polling interval
DEFAULT_VERIFY_INTERVAL_S = 60.0
# 32 MiB: measured to lose no event in a 100k-event storm with the watcher at nice 19.
DEFAULT_RCVBUF_BYTES = 32 * 1024 * 1024
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
    fallback: bool = True  # the seed's methods (b) and (c) when no rule matches
    rcvbuf_bytes: int = DEFAULT_RCVBUF_BYTES
    realtime: bool = False  # SCHED_FIFO: the exec -> protected tail is CPU contention
    group_kill: Policy = DEFAULT_POLICY  # what to do where the cgroup kills as a group
    ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S
    proc_root: str = "/proc"
    cgroup_root: str = ""  # prefixes the cgroup mount points (unit tests: a fake cgroupfs)


def compile_pattern(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as err:
        raise UsageError(f"--pattern {text!r} is not a valid regular expression: {err}") from None


def check_data_dir(path: str) -> str:
    if not path or not path.startswith("/"):
        raise UsageError(f"--data-dir {path!r} must be an absolute path, such as /pgdata/pg16")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--data-dir {path} exists but is not a directory")
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
    validate_score(score)
    if children_score is not None:
        validate_score(children_score, "--children-score")
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
    group_kill: str = DEFAULT_POLICY.value,
    **rest: object,
) -> Settings:
    policy = parse_policy(group_kill)
    source = source.lower()
    if source not in SOURCES:
        raise UsageError(f"--source {source!r} is unknown: use one of {', '.join(SOURCES)}")
    if interval_s <= 0:
        raise UsageError(f"--interval {interval_s} must be greater than 0 seconds")
    if verify_interval_s <= 0:
        raise UsageError(f"--verify-interval {verify_interval_s} must be greater than 0 seconds")
    rcvbuf_bytes = rest.get("rcvbuf_bytes", DEFAULT_RCVBUF_BYTES)
    if not isinstance(rcvbuf_bytes, int) or rcvbuf_bytes <= 0:
        raise UsageError(f"--rcvbuf {rcvbuf_bytes} must be a positive number of bytes")
    dirs = [check_data_dir(d) for d in (data_dirs or [])]
    if source == "inotify" and not dirs:
        raise UsageError("--source inotify needs at least one --data-dir (e.g. /pgdata/pg16)")
    rules = build_rules(list(patterns or []), dirs, score, children_score, match_all)
    return Settings(
        rules=rules,
        data_dirs=dirs,
        source=source,
        interval_s=interval_s,
        verify_interval_s=verify_interval_s,
        group_kill=policy,
        **rest,  # type: ignore[arg-type]
    )
