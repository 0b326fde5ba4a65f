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
from dataclasses import dataclass
from typing import Any, Optional

from watcher.config import SOURCES, Settings, make_settings
from watcher.errors import UsageError
from watcher.groupkill import POLICIES
from watcher.match import DEFAULT_SCORE, OOM_SCORE_ADJ_MAX, OOM_SCORE_ADJ_MIN, Rule

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.9/3.10 (UBI 9's python3 is 3.9): the same parser, from PyPI
    # mypy checks as 3.9 but runs where tomli need not be installed.
    import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]

DEFAULT_CONFIG_PATH = "/etc/pgoom.toml"
# loguru's levels that make sense for pgoom (TRACE adds nothing: pgoom logs none).
LOG_LEVELS = ("DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")

# Top-level keys: name -> accepted Python types (bool is not an int here, and an int is a
# fine float). The names are the long options without "--", with "-" as "_".
OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "source": (str,),
    "score": (int,),
    "children_score": (int,),
    "interval": (int, float),
    "verify_interval": (int, float),
    "all": (bool,),
    "fallback": (bool,),
    "log_file": (str,),
    "log_json": (bool,),
    "log_level": (str,),
    "dry_run": (bool,),
    "rcvbuf": (int,),
    "realtime": (bool,),
    "group_kill": (str,),
    "metrics_address": (str,),
}
RULE_TYPES: dict[str, tuple[type, ...]] = {
    "pattern": (str,),
    "data_dir": (str,),
    "all": (bool,),
    "score": (int,),
    "children_score": (int,),
}
# cli.watch's parameter name for each top-level key, where the two differ.
PARAM_OF_KEY = {"all": "all_postmasters"}


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
    lines = _KeyLines(text)

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
        if key not in OPTION_TYPES:
            if isinstance(value, dict):
                raise fail(line, f"unknown table [{key}]: the tables are [[rule]]")
            raise fail(line, f"unknown key {key!r} (known: {', '.join(OPTION_TYPES)}, [[rule]])")
        _check_type(key, value, OPTION_TYPES[key], line, fail)
        if key in ("score", "children_score"):
            _check_score(key, value, line, fail)
        elif key in ("interval", "verify_interval") and value <= 0:
            raise fail(line, f"{key} = {value}: must be greater than 0 seconds")
        elif key == "source" and value.lower() not in SOURCES:
            raise fail(line, f"source = {value!r} is unknown: use one of {', '.join(SOURCES)}")
        elif key == "log_level" and value.upper() not in LOG_LEVELS:
            raise fail(
                line, f"log_level = {value!r} is unknown: use one of {', '.join(LOG_LEVELS)}"
            )
        elif key == "rcvbuf" and value <= 0:
            raise fail(line, f"rcvbuf = {value}: must be a positive number of bytes")
        elif key == "group_kill" and value.strip().lower() not in POLICIES:
            raise fail(line, f"group_kill = {value!r} is unknown: use one of {', '.join(POLICIES)}")
        elif key == "metrics_address" and value:
            from watcher.metrics import parse_address

            try:
                parse_address(value)
            except UsageError as err:
                raise fail(line, str(err).replace("--metrics-address", "metrics_address")) from None
        options[key] = value
    return ConfigFile(path=path, options=options, rules=rules)


def _rule(table: dict[str, Any], index: int, lines: _KeyLines, fail: Any) -> RuleSpec:
    header = lines.of("rule", index, "")
    for key, value in table.items():
        line = lines.of("rule", index, key)
        if key not in RULE_TYPES:
            raise fail(line, f"unknown key {key!r} in [[rule]] (known: {', '.join(RULE_TYPES)})")
        _check_type(key, value, RULE_TYPES[key], line, fail)
        if key in ("score", "children_score"):
            _check_score(key, value, line, fail)
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
        try:
            re.compile(pattern)
        except re.error as err:
            raise fail(
                lines.of("rule", index, "pattern"),
                f"pattern {pattern!r} is not a valid regular expression: {err}",
            ) from None
    data_dir = table.get("data_dir")
    if data_dir is not None:
        where = lines.of("rule", index, "data_dir")
        if not data_dir.startswith("/"):
            raise fail(where, f"data_dir {data_dir!r} must be an absolute path")
        if os.path.exists(data_dir) and not os.path.isdir(data_dir):
            raise fail(where, f"data_dir {data_dir} exists but is not a directory")
        data_dir = os.path.normpath(data_dir)
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


def _check_score(key: str, value: int, line: int, fail: Any) -> None:
    if not OOM_SCORE_ADJ_MIN <= value <= OOM_SCORE_ADJ_MAX:
        raise fail(line, f"{key} = {value} is out of range: use a value from -1000 to 1000")


_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\"|'[^']*')\s*=")


class _KeyLines:
    """Line numbers of table headers and keys, found by scanning the text: enough to point
    an operator at the right line of a small config file."""

    def __init__(self, text: str) -> None:
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


def resolve(params: dict[str, Any], explicit: set[str]) -> Resolved:
    """Settings for `pgoom watch` from cli.watch's parameters. `explicit` names the
    parameters given on the command line or in the environment: those win over the file.
    `params["pattern"]`/`["data_dir"]` are lists, already read from their env vars."""
    path, required = config_path(params.get("config"))
    loaded = read_config(path, required) if path else None
    notes: list[str] = []
    file_options = loaded.options if loaded else {}

    def pick(key: str) -> Any:
        param = PARAM_OF_KEY.get(key, key)
        if param in explicit or key not in file_options:
            return params.get(param)
        return file_options[key]

    cli_rules = bool(params.get("pattern")) or bool(params.get("data_dir"))
    file_rules = loaded.rules if loaded else []
    score = pick("score")
    children_score = pick("children_score")
    match_all = bool(pick("all"))
    use_file_rules = bool(file_rules) and not cli_rules
    if loaded is not None:
        notes.append(
            f"config file {loaded.path}: {len(file_options)} option(s), {len(file_rules)} rule(s)"
        )
    if file_rules and cli_rules:
        notes.append(
            f"--pattern/--data-dir given: the file's {len(file_rules)} [[rule]](s) are not used"
        )
    data_dirs = (
        [r.data_dir for r in file_rules if r.data_dir] if use_file_rules else params["data_dir"]
    )
    log_file = pick("log_file")
    log_level = str(pick("log_level")).upper()
    if log_level not in LOG_LEVELS:
        raise UsageError(f"--log-level {log_level} is unknown: use one of {', '.join(LOG_LEVELS)}")
    settings = make_settings(
        patterns=list(params.get("pattern") or []),
        data_dirs=list(data_dirs or []),
        score=score if score is not None else DEFAULT_SCORE,
        children_score=children_score,
        source=pick("source"),
        interval_s=float(pick("interval")),
        verify_interval_s=float(pick("verify_interval")),
        match_all=match_all,
        log_file=log_file or None,
        log_json=bool(pick("log_json")),
        log_level=log_level,
        dry_run=bool(pick("dry_run")),
        fallback=_fallback(pick("fallback"), cli_rules or use_file_rules),
        rcvbuf_bytes=int(pick("rcvbuf")),
        realtime=bool(pick("realtime")),
        group_kill=str(pick("group_kill") or "auto"),
    )
    if use_file_rules:
        rules = [_to_rule(spec, score, children_score, explicit) for spec in file_rules]
        if match_all and not any(spec.all for spec in file_rules):
            rules.append(Rule(score=score, children_score=children_score))
        settings = dataclasses.replace(settings, rules=rules)
    metrics_address = pick("metrics_address") or None
    if metrics_address:
        from watcher.metrics import parse_address

        parse_address(metrics_address)
    return Resolved(settings=settings, metrics_address=metrics_address, notes=tuple(notes))


def _to_rule(
    spec: RuleSpec,
    score: int,
    children_score: Optional[int],
    explicit: set[str],
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


def _fallback(choice: Any, rules_given: bool) -> bool:
    """The seed's fallbacks guess; they suit the default pattern. Once the operator names
    what to protect, guessing would protect some other cluster on the host, so it is off
    unless asked for."""
    return (not rules_given) if choice is None else bool(choice)
