"""The rules file (TOML, /etc/pgoom.toml by default) and how it meets the command line.

Precedence, highest first: a command-line option, its PGOOM_* environment variable, the
file, the built-in default. Rules are taken whole from one place: --pattern/--data-dir
(or PGOOM_PATTERN/PGOOM_DATA_DIR) replace the file's [[rule]] tables, and an explicit
--score/--children-score applies to every rule, the file's included. docs/configuration.md
is the reference; keep the two in step.

A bad file is reported as one line, `<file>:<line>: <problem>`, exit 2: TOML parsers give
no positions for values, so the line of a key is found by a light scan of the text.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar, cast

from watcher.config import Settings, check_data_dir, make_settings
from watcher.errors import UsageError
from watcher.match import Rule
from watcher.options import (
    ALL,
    CHILDREN_SCORE,
    DEFAULT_CONFIG_PATH,
    DEFAULT_INTERVAL_S,
    DEFAULT_LOG_FILE,
    DEFAULT_RCVBUF_BYTES,
    DEFAULT_VERIFY_INTERVAL_S,
    DRY_RUN,
    FALLBACK,
    FILE_KEYS,
    GROUP_KILL,
    INTERVAL,
    LOG_FILE,
    LOG_JSON,
    LOG_LEVEL,
    METRICS_ADDRESS,
    PATTERN,
    RCVBUF,
    REALTIME,
    RULE_KEYS,
    SCORE,
    SOURCE,
    VERIFY_INTERVAL,
    Option,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.9/3.10 (UBI 9's python3 is 3.9): the same parser, from PyPI
    # mypy checks as 3.9 but runs where tomli need not be installed.
    import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]

T = TypeVar("T")


@dataclass(frozen=True)
class RuleSpec:
    """One [[rule]] table; None means "not set in the file"."""

    line: int
    pattern: Optional[str] = None
    data_dir: Optional[str] = None
    all: bool = False
    score: Optional[int] = None
    children_score: Optional[int] = None


@dataclass(frozen=True)
class ConfigFile:
    path: str
    options: dict[str, Any]
    rules: list[RuleSpec]


@dataclass(frozen=True)
class WatchArgs:
    """What `pgoom watch` was given: each option from the command line, else its PGOOM_*
    variable, else its default. `explicit` names (Option.name) the options given on the
    command line or in the environment: those win over the file."""

    source: str = SOURCE.default
    score: int = SCORE.default
    patterns: list[str] = field(default_factory=list)
    data_dirs: list[str] = field(default_factory=list)
    interval_s: float = DEFAULT_INTERVAL_S
    verify_interval_s: float = DEFAULT_VERIFY_INTERVAL_S
    children_score: Optional[int] = None
    match_all: bool = False
    fallback: Optional[bool] = None
    log_file: str = DEFAULT_LOG_FILE
    log_json: bool = False
    log_level: str = LOG_LEVEL.default
    dry_run: bool = False
    rcvbuf_bytes: int = DEFAULT_RCVBUF_BYTES
    realtime: bool = False
    group_kill: str = GROUP_KILL.default
    metrics_address: str = ""
    config: Optional[str] = None
    explicit: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Resolved:
    """What `pgoom watch` runs with, and what to say about where it came from."""

    settings: Settings
    metrics_address: Optional[str]
    notes: tuple[str, ...] = ()


# --- reading and checking the file --------------------------------------------------------


def read_config(path: str, required: bool) -> Optional[ConfigFile]:
    """Parse and check `path`. A missing file is an error only when it was asked for."""
    try:
        with open(path, "rb") as f:
            _check_owner(path, os.fstat(f.fileno()))
            raw = f.read()
    except FileNotFoundError:
        if required:
            raise UsageError(f"--config {path}: no such file") from None
        return None
    except OSError as err:
        raise UsageError(f"--config {path}: cannot read: {os.strerror(err.errno or 0)}") from None
    text = raw.decode("utf-8", "replace")
    return parse_config(text, path)


def _check_owner(path: str, info: os.stat_result) -> None:
    """Run as root, pgoom must not take rules (or a log path) from a file another user can
    change: the same rule sshd and sudo apply to their configuration."""
    if os.geteuid() != 0:
        return
    if info.st_uid != 0 or info.st_mode & 0o022:
        raise UsageError(
            f"{path}: owned by uid {info.st_uid} with mode {info.st_mode & 0o777:04o}: "
            f"it must belong to root and not be writable by others (chown root {path}; "
            f"chmod go-w {path})"
        )


_POSITION = re.compile(r"\s*\(at (?:line (\d+), column \d+|end of document)\)$")


def parse_config(text: str, path: str) -> ConfigFile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        message = str(err)
        found = _POSITION.search(message)
        line = int(found.group(1)) if found and found.group(1) else text.count("\n") + 1
        problem = _POSITION.sub("", message) if found else message
        raise UsageError(f"{path}:{line}: {problem[:1].lower()}{problem[1:]}") from None
    lines = _KeyLines(text, path)

    def fail(line: int, problem: str) -> UsageError:
        return UsageError(f"{path}:{line}: {problem}")

    options: dict[str, Any] = {}
    rules: list[RuleSpec] = []
    for key, value in data.items():
        line = lines.of("", 0, key)
        if key == "rule":
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                raise fail(line, "'rule' must be an array of tables: write [[rule]] headers")
            rules = [_rule(table, i, lines, fail) for i, table in enumerate(value)]
            continue
        option = FILE_KEYS.get(key)
        if option is None:
            if isinstance(value, dict):
                raise fail(line, f"unknown table [{key}]: the tables are [[rule]]")
            raise fail(line, f"unknown key {key!r} (known: {', '.join(FILE_KEYS)}, [[rule]])")
        _check_type(key, value, option.kinds, line, fail)
        option.validate(value, f"{path}:{line}: {key} =")
        options[key] = value
    return ConfigFile(path=path, options=options, rules=rules)


def _rule(table: dict[str, Any], index: int, lines: _KeyLines, fail: Any) -> RuleSpec:
    header = lines.of("rule", index, "")
    for key, value in table.items():
        line = lines.of("rule", index, key)
        if key not in RULE_KEYS:
            raise fail(line, f"unknown key {key!r} in [[rule]] (known: {', '.join(RULE_KEYS)})")
        _check_type(key, value, RULE_KEYS[key], line, fail)
        if key in ("score", "children_score"):
            SCORE.validate(value, f"{lines.source}:{line}: {key} =")
    chosen = [k for k in ("pattern", "data_dir") if k in table] + (
        ["all"] if table.get("all") else []
    )
    if len(chosen) != 1:
        raise fail(
            header,
            'a [[rule]] needs exactly one of pattern = "REGEX", data_dir = "/path" or '
            f"all = true (this one has {', '.join(chosen) or 'none'})",
        )
    pattern = table.get("pattern")
    if pattern is not None:
        PATTERN.validate_item(
            pattern, f"{lines.source}:{lines.of('rule', index, 'pattern')}: pattern ="
        )
    data_dir = table.get("data_dir")
    if data_dir is not None:
        where = f"{lines.source}:{lines.of('rule', index, 'data_dir')}: data_dir ="
        data_dir = check_data_dir(data_dir, where)
    return RuleSpec(
        line=header,
        pattern=pattern,
        data_dir=data_dir,
        all=bool(table.get("all")),
        score=table.get("score"),
        children_score=table.get("children_score"),
    )


def _check_type(key: str, value: object, types: tuple[type, ...], line: int, fail: Any) -> None:
    # TOML's true is a Python bool, and bool is an int: "score = true" must not pass.
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
        want = " or ".join(dict.fromkeys(names[t] for t in types))
        raise fail(line, f"{key} must be {want}, not {value!r}")


_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\"|'[^']*')\s*=")


class _KeyLines:
    """Line numbers of table headers and keys, found by scanning the text: enough to point
    an operator at the right line of a small config file."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source  # the file's path, for messages
        self._lines: dict[tuple[str, int, str], int] = {}
        table, index = "", 0
        counts: dict[str, int] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            header = _HEADER.match(line)
            if header:
                table = header.group(2).strip("\"'")
                if header.group(1) == "[[":
                    index = counts.get(table, 0)
                    counts[table] = index + 1
                else:
                    index = 0
                self._lines.setdefault((table, index, ""), number)
                self._lines.setdefault(("", 0, table), number)
                continue
            key = _KEY.match(line)
            if key:
                self._lines.setdefault((table, index, key.group(1).strip("\"'")), number)

    def of(self, table: str, index: int, key: str) -> int:
        return self._lines.get((table, index, key)) or self._lines.get((table, index, ""), 1)


# --- merging with the command line ---------------------------------------------------------


def config_path(given: Optional[str]) -> tuple[Optional[str], bool]:
    """(path, required): --config/PGOOM_CONFIG if given ('' means no file at all), else the
    default path, used only if it exists."""
    if given is None:
        return DEFAULT_CONFIG_PATH, False
    if given == "":
        return None, False
    return given, True


def resolve(args: WatchArgs) -> Resolved:
    """Settings for `pgoom watch`: the options given explicitly, then the file, then the
    defaults."""
    path, required = config_path(args.config)
    loaded = read_config(path, required) if path else None
    notes: list[str] = []
    file_options = loaded.options if loaded else {}

    def pick(option: Option[Any], given: T) -> T:
        if option.name in args.explicit or option.key not in file_options:
            return given
        return cast(T, file_options[option.key])  # checked against option.kinds on reading

    cli_rules = bool(args.patterns) or bool(args.data_dirs)
    file_rules = loaded.rules if loaded else []
    score = pick(SCORE, args.score)
    children_score = pick(CHILDREN_SCORE, args.children_score)
    match_all = pick(ALL, args.match_all)
    use_file_rules = bool(file_rules) and not cli_rules
    if loaded is not None:
        notes.append(
            f"config file {loaded.path}: {len(file_options)} option(s), {len(file_rules)} rule(s)"
        )
    if file_rules and cli_rules:
        notes.append(
            f"--pattern/--data-dir given: the file's {len(file_rules)} [[rule]](s) are not used"
        )
    data_dirs = [r.data_dir for r in file_rules if r.data_dir] if use_file_rules else args.data_dirs
    fallback = pick(FALLBACK, args.fallback)
    settings = make_settings(
        patterns=list(args.patterns),
        data_dirs=list(data_dirs),
        score=score,
        children_score=children_score,
        source=pick(SOURCE, args.source),
        interval_s=float(pick(INTERVAL, args.interval_s)),
        verify_interval_s=float(pick(VERIFY_INTERVAL, args.verify_interval_s)),
        match_all=match_all,
        log_file=pick(LOG_FILE, args.log_file) or None,
        log_json=pick(LOG_JSON, args.log_json),
        log_level=pick(LOG_LEVEL, args.log_level),
        dry_run=pick(DRY_RUN, args.dry_run),
        fallback=_fallback(fallback, cli_rules or use_file_rules),
        rcvbuf_bytes=pick(RCVBUF, args.rcvbuf_bytes),
        realtime=pick(REALTIME, args.realtime),
        group_kill=pick(GROUP_KILL, args.group_kill),
    )
    if use_file_rules:
        rules = [_to_rule(spec, score, children_score, args.explicit) for spec in file_rules]
        if match_all and not any(spec.all for spec in file_rules):
            rules.append(Rule(score=score, children_score=children_score))
        settings = dataclasses.replace(settings, rules=rules)
    metrics_address = METRICS_ADDRESS.validate(pick(METRICS_ADDRESS, args.metrics_address))
    return Resolved(settings=settings, metrics_address=metrics_address or None, notes=tuple(notes))


def _to_rule(
    spec: RuleSpec,
    score: int,
    children_score: Optional[int],
    explicit: frozenset[str],
) -> Rule:
    """A file rule's own score holds unless --score/PGOOM_SCORE was given; without either,
    the file's top-level score (already in `score`) is the default."""
    if "score" not in explicit and spec.score is not None:
        score = spec.score
    if "children_score" not in explicit and spec.children_score is not None:
        children_score = spec.children_score
    return Rule(
        score=score,
        pattern=re.compile(spec.pattern) if spec.pattern is not None else None,
        data_dir=spec.data_dir,
        children_score=children_score,
    )


def _fallback(choice: Optional[bool], rules_given: bool) -> bool:
    """The fallbacks (the parent of other postgres processes, else the only one) guess; they
    suit the default pattern. Once the operator names what to protect, guessing would
    protect some other cluster on the host, so it is off unless asked for."""
    return (not rules_given) if choice is None else choice
