"""Every option of `pgoom watch` (and `verify`'s timeout), declared once: its flag, default,
help, PGOOM_* variable, config-file key, the value types the file may give it, and the
check of a value. watcher.cli builds the typer options from these, watcher.config_file
the TOML keys and their checks, watcher.config the checks of the command line, and
tests/unit/test_man_page.py the documentation checks. One check, so one wording: the
command line says `--score 5000 is out of range: ...`, the file `score = 5000 is out of
range: ...`.

`pgoom exec` parses its few options itself (watcher.exec.entrypoint: it runs before any
of this is imported) with the same checks from watcher.limits.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Optional, TypeVar

from watcher.errors import UsageError
from watcher.limits import (
    DEFAULT_PATTERN,
    DEFAULT_SCORE,
    GROUP_KILL_POLICIES,
    data_dir_problem,
    score_problem,
)
from watcher.parse import parse_address

T = TypeVar("T")

SOURCES = ("auto", "netlink", "inotify", "poll")
# loguru's levels that make sense for pgoom (TRACE adds nothing: pgoom logs none).
LOG_LEVELS = ("DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
DEFAULT_CONFIG_PATH = "/etc/pgoom.toml"
DEFAULT_LOG_FILE = "/tmp/postgres-oom-adjuster.log"
DEFAULT_INTERVAL_S = 30.0  # the polling interval of the script pgoom replaces
DEFAULT_VERIFY_INTERVAL_S = 60.0
# 32 MiB: measured to lose no event in a 100k-event storm with the watcher at nice 19.
DEFAULT_RCVBUF_BYTES = 32 * 1024 * 1024
DEFAULT_VERIFY_TIMEOUT_S = 10.0
# The guard's defaults (docs/guard.md, Tuning): 90 % of a 300 MiB limit leaves ~170 ms at
# the harness's ~175 MB/s; a cancelled query gave its memory back within ~5 ms here.
DEFAULT_GUARD_THRESHOLD_PCT = 90.0
DEFAULT_GUARD_GRACE_S = 1.0
DEFAULT_GUARD_COOLDOWN_S = 10.0
DEFAULT_GUARD_FLOOR_MB = 6


@dataclass(frozen=True)
class Option(Generic[T]):
    flag: str  # the long option; its secondary form (--no-x) is in `flag` as typer writes it
    default: T
    help: str
    env: str = ""  # the PGOOM_* variable; "" for none
    key: str = ""  # the config-file key; "" when the file cannot set it
    kinds: tuple[type, ...] = ()  # the TOML types the key accepts (bool is not an int)
    check: Optional[Callable[[Any], str]] = None  # the problem with a value, '' for none
    separator: str = ""  # a repeatable option: how its variable separates the values

    @property
    def name(self) -> str:
        """The long option without '--' and '/--no-...', as the typer parameter name."""
        return self.flag.split("/", 1)[0].removeprefix("--").replace("-", "_")

    def problem(self, value: Any) -> str:
        return self.check(value) if self.check is not None and value is not None else ""

    def validate(self, value: T, where: str = "") -> T:
        """`value`, or one UsageError: '<where> <problem>' (where: the flag by default)."""
        self._fail(self.problem(value), where)
        return value

    def validate_item(self, item: str, where: str = "") -> str:
        """One value of a repeatable option (--pattern, --data-dir), checked the same way."""
        self._fail(self.problem(item), where)
        return item

    def _fail(self, problem: str, where: str) -> None:
        if problem:
            raise UsageError(f"{where or self.flag} {problem}")


def _shown(value: object) -> str:
    if isinstance(value, str):
        return repr(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


# Every number is finite and bounded: `nan` compares false with everything (an interval of
# nan made the loop spin, a timeout of nan never ended), and a day is longer than any
# interval or timeout pgoom has a use for.
MAX_SECONDS = 86400.0
# SO_RCVBUF(FORCE) takes a C int; the kernel doubles it and caps it at INT_MAX.
MAX_RCVBUF_BYTES = 2**31 - 1


def _positive_seconds(value: float) -> str:
    if math.isfinite(value) and 0 < value <= MAX_SECONDS:
        return ""
    return f"{_shown(value)} must be greater than 0 and at most {MAX_SECONDS:g} seconds"


def _not_negative_seconds(value: float) -> str:
    if math.isfinite(value) and 0 <= value <= MAX_SECONDS:
        return ""
    return f"{_shown(value)} must be from 0 to {MAX_SECONDS:g} seconds"


def _positive_bytes(value: int) -> str:
    if 0 < value <= MAX_RCVBUF_BYTES:
        return ""
    return f"{value} must be from 1 to {MAX_RCVBUF_BYTES} bytes"


def _one_of(choices: tuple[str, ...], fold: Callable[[str], str]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if fold(value) in choices:
            return ""
        return f"{value!r} is unknown: use one of {', '.join(choices)}"

    return check


def _percent(value: float) -> str:
    return "" if 50 <= value < 100 else f"{_shown(value)} must be from 50 to below 100 (percent)"


def _mebibytes(value: int) -> str:
    return "" if value >= 0 else f"{value} must be 0 or more MiB"


def _regex(value: str) -> str:
    try:
        compiled = re.compile(value)
    except re.error as err:
        return f"{value!r} is not a valid regular expression: {err}"
    if compiled.search("postgres -D /") is not None and compiled.search("") is not None:
        # '' or '.*' is found in every data directory: a typo or an empty variable that
        # would protect every postmaster on the host; --all says so on purpose.
        return f"{value!r} matches every data directory: use --all to protect every postmaster"
    return ""


def _address(value: str) -> str:
    if not value:
        return ""  # off
    try:
        parse_address(value)
    except ValueError as err:
        return str(err)
    return ""


SOURCE = Option(
    "--source",
    "auto",
    "auto|netlink|inotify|poll",
    env="PGOOM_SOURCE",
    key="source",
    kinds=(str,),
    check=_one_of(SOURCES, str.lower),
)
SCORE = Option(
    "--score",
    DEFAULT_SCORE,
    "oom_score_adj for postmasters (-1000..1000).",
    env="PGOOM_SCORE",
    key="score",
    kinds=(int,),
    check=score_problem,
)
PATTERN: Option[Optional[list[str]]] = Option(
    "--pattern",
    None,
    "Regex searched in 'postgres -D <resolved data directory>' (repeatable). "
    f"Env: PGOOM_PATTERN, one pattern per line. Default: {DEFAULT_PATTERN!r}.",
    env="PGOOM_PATTERN",
    separator="\n",
    check=_regex,
)
DATA_DIR: Option[Optional[list[str]]] = Option(
    "--data-dir",
    None,
    "A data directory to protect and watch (repeatable). Env: PGOOM_DATA_DIR, colon-separated.",
    env="PGOOM_DATA_DIR",
    separator=":",
    check=data_dir_problem,
)


def _binary_paths(value: object) -> str:
    """Absolute paths, from the command line (one at a time) or the file (a list)."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, str) or not item.startswith("/"):
            return f"{item!r} must be an absolute path, such as /opt/pg16/bin/postgres"
    return ""


TRUSTED_BINARY: Option[Optional[list[str]]] = Option(
    "--trusted-binary",
    None,
    "A server binary to trust although root does not own it and every directory above it, "
    "as the postmaster sees the path (repeatable). Env: PGOOM_TRUSTED_BINARY, colon-separated.",
    env="PGOOM_TRUSTED_BINARY",
    key="trusted_binaries",
    kinds=(list,),
    separator=":",
    check=_binary_paths,
)
INTERVAL = Option(
    "--interval",
    DEFAULT_INTERVAL_S,
    "Seconds between scans (poll source; child scans without netlink).",
    env="PGOOM_INTERVAL",
    key="interval",
    kinds=(int, float),
    check=_positive_seconds,
)
VERIFY_INTERVAL = Option(
    "--verify-interval",
    DEFAULT_VERIFY_INTERVAL_S,
    "Seconds between checks that protected postmasters kept their score.",
    env="PGOOM_VERIFY_INTERVAL",
    key="verify_interval",
    kinds=(int, float),
    check=_positive_seconds,
)
CHILDREN_SCORE: Option[Optional[int]] = Option(
    "--children-score",
    None,
    "Also set each new child of a protected postmaster to this score.",
    env="PGOOM_CHILDREN_SCORE",
    key="children_score",
    kinds=(int,),
    check=score_problem,
)
ALL = Option(
    "--all",
    False,
    "Protect every verified postmaster, whatever its command line.",
    env="PGOOM_ALL",
    key="all",
    kinds=(bool,),
)
FALLBACK: Option[Optional[bool]] = Option(
    "--fallback/--no-fallback",
    None,
    "When no rule matches any process, protect the postgres process that is the parent of "
    "other postgres processes, else the only postgres process. Default: on with the "
    "default pattern, off once --pattern, --data-dir or rules in the config file are given.",
    env="PGOOM_FALLBACK",
    key="fallback",
    kinds=(bool,),
)
LOG_FILE = Option(
    "--log-file",
    DEFAULT_LOG_FILE,
    "Log file ('' for none).",
    env="PGOOM_LOG_FILE",
    key="log_file",
    kinds=(str,),
)
LOG_JSON = Option(
    "--log-json", False, "Log JSON lines.", env="PGOOM_LOG_JSON", key="log_json", kinds=(bool,)
)
LOG_LEVEL = Option(
    "--log-level",
    "INFO",
    f"{', '.join(LOG_LEVELS)} (any case).",
    env="PGOOM_LOG_LEVEL",
    key="log_level",
    kinds=(str,),
    check=_one_of(LOG_LEVELS, str.upper),
)
DRY_RUN = Option(
    "--dry-run",
    False,
    "Log what would change; write nothing.",
    env="PGOOM_DRY_RUN",
    key="dry_run",
    kinds=(bool,),
)
RCVBUF = Option(
    "--rcvbuf",
    DEFAULT_RCVBUF_BYTES,
    "Netlink receive buffer in bytes.",
    env="PGOOM_RCVBUF",
    key="rcvbuf",
    kinds=(int,),
    check=_positive_bytes,
)
REALTIME = Option(
    "--realtime",
    False,
    "Run at SCHED_FIFO priority 1 (needs CAP_SYS_NICE): a starting postmaster then never "
    "waits behind other tasks for its protection.",
    env="PGOOM_REALTIME",
    key="realtime",
    kinds=(bool,),
)
GROUP_KILL = Option(
    "--group-kill",
    "auto",
    "auto|ungroup|keep: where the postmaster's memory cgroup kills as a group (cgroup v2 "
    "memory.oom.group=1, kubelet 1.28+), auto protects with -1000 and keeps its children off "
    "-1000; ungroup writes 0 to that cgroup's memory.oom.group and keeps --score; keep "
    "changes nothing (it will not survive a group kill).",
    env="PGOOM_GROUP_KILL",
    key="group_kill",
    kinds=(str,),
    check=_one_of(GROUP_KILL_POLICIES, lambda text: text.strip().lower()),
)
METRICS_ADDRESS = Option(
    "--metrics-address",
    "",
    "Serve Prometheus metrics on HOST:PORT (e.g. 127.0.0.1:9187). Default: off.",
    env="PGOOM_METRICS_ADDRESS",
    key="metrics_address",
    kinds=(str,),
    check=_address,
)
GUARD = Option(
    "--guard",
    False,
    "Cancel the query of the client backend with the most private memory (SIGINT, then "
    "SIGTERM; never SIGKILL) when a protected postmaster's memory nears its limit "
    "(docs/guard.md).",
    env="PGOOM_GUARD",
    key="guard",
    kinds=(bool,),
)
GUARD_DRY_RUN = Option(
    "--guard-dry-run",
    False,
    "Guard, but only log what it would signal (implies --guard).",
    env="PGOOM_GUARD_DRY_RUN",
    key="guard_dry_run",
    kinds=(bool,),
)
GUARD_THRESHOLD_PCT = Option(
    "--guard-threshold-pct",
    DEFAULT_GUARD_THRESHOLD_PCT,
    "The guard acts when the working set reaches this percentage of the memory limit.",
    env="PGOOM_GUARD_THRESHOLD_PCT",
    key="guard_threshold_pct",
    kinds=(int, float),
    check=_percent,
)
GUARD_GRACE = Option(
    "--guard-grace",
    DEFAULT_GUARD_GRACE_S,
    "Seconds a SIGINT has to bring relief before SIGTERM (and SIGTERM before the guard gives up).",
    env="PGOOM_GUARD_GRACE",
    key="guard_grace",
    kinds=(int, float),
    check=_positive_seconds,
)
GUARD_COOLDOWN = Option(
    "--guard-cooldown",
    DEFAULT_GUARD_COOLDOWN_S,
    "Seconds after an episode without relief in which pressure is only counted: one "
    "episode, one query.",
    env="PGOOM_GUARD_COOLDOWN",
    key="guard_cooldown",
    kinds=(int, float),
    check=_not_negative_seconds,
)
GUARD_FLOOR_MB = Option(
    "--guard-floor-mb",
    DEFAULT_GUARD_FLOOR_MB,
    "A backend with less private memory (MiB) is never chosen.",
    env="PGOOM_GUARD_FLOOR_MB",
    key="guard_floor_mb",
    kinds=(int,),
    check=_mebibytes,
)
CONFIG: Option[Optional[str]] = Option(
    "--config",
    None,
    f"TOML rules file (default {DEFAULT_CONFIG_PATH} if it exists; '' for none). "
    "Options and PGOOM_* variables override it.",
    env="PGOOM_CONFIG",
)
VERIFY_TIMEOUT = Option(
    "--timeout",
    DEFAULT_VERIFY_TIMEOUT_S,
    "Seconds to wait for protection.",
    env="PGOOM_VERIFY_TIMEOUT",
    check=_not_negative_seconds,
)

# `pgoom watch`'s options, in its --help order.
WATCH: tuple[Option[Any], ...] = (
    SOURCE,
    SCORE,
    PATTERN,
    DATA_DIR,
    TRUSTED_BINARY,
    INTERVAL,
    VERIFY_INTERVAL,
    CHILDREN_SCORE,
    ALL,
    FALLBACK,
    LOG_FILE,
    LOG_JSON,
    LOG_LEVEL,
    DRY_RUN,
    RCVBUF,
    REALTIME,
    GROUP_KILL,
    METRICS_ADDRESS,
    GUARD,
    GUARD_DRY_RUN,
    GUARD_THRESHOLD_PCT,
    GUARD_GRACE,
    GUARD_COOLDOWN,
    GUARD_FLOOR_MB,
    CONFIG,
)
# The config file's top-level keys, and the keys of a [[rule]] table.
FILE_KEYS: dict[str, Option[Any]] = {o.key: o for o in WATCH if o.key}
RULE_KEYS: dict[str, tuple[type, ...]] = {
    "pattern": (str,),
    "data_dir": (str,),
    "all": (bool,),
    "score": (int,),
    "children_score": (int,),
}


def env_list(
    values: Optional[list[str]], option: Option[Any], environ: dict[str, str]
) -> list[str]:
    """A repeatable option's values: those given, else its variable split at the option's
    separator (click's whitespace split would cut a regex such as 'postgres -D /x' apart)."""
    if values:
        return list(values)
    raw = environ.get(option.env, "")
    return [item for item in raw.split(option.separator) if item.strip()]
