"""The typer layer: parse options, call the engine and the plain modules, map errors to exit
codes. No logic lives here. Every option has a PGOOM_* environment variable."""

# No `from __future__ import annotations` here: typer before 0.24 (the newest on Python 3.9,
# the Percona image's python3) reads string annotations through get_type_hints() without
# extras, which drops every Annotated option declaration and its PGOOM_* env var.
import importlib
import os
import sys
from typing import Annotated, Any, Optional

import typer

from watcher import __version__
from watcher.config import (
    DEFAULT_INTERVAL_S,
    DEFAULT_LOG_FILE,
    DEFAULT_RCVBUF_BYTES,
    DEFAULT_VERIFY_INTERVAL_S,
)
from watcher.config_file import DEFAULT_CONFIG_PATH
from watcher.errors import EXIT_USAGE, PgoomError
from watcher.match import DEFAULT_SCORE

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Keep the PostgreSQL postmaster out of the OOM killer's reach.",
    pretty_exceptions_enable=False,
)


def _env_list(values: Optional[list[str]], name: str, sep: str) -> list[str]:
    """Repeatable options take their env var as a list with an explicit separator: click's
    whitespace split would cut a regex such as 'postgres -D /pgdata/pg' apart."""
    if values:
        return list(values)
    raw = os.environ.get(name, "")
    return [item for item in raw.split(sep) if item.strip()]


def _fail(err: PgoomError) -> None:
    typer.echo(f"pgoom: {err}", err=True)
    raise typer.Exit(err.exit_code)


Score = Annotated[
    int,
    typer.Option(
        "--score", envvar="PGOOM_SCORE", help="oom_score_adj for postmasters (-1000..1000)."
    ),
]
Patterns = Annotated[
    Optional[list[str]],
    typer.Option(
        "--pattern",
        help="Regex on the command line of a postmaster (repeatable). "
        "Env: PGOOM_PATTERN, one pattern per line. Default: 'postgres -D /pgdata/pg'.",
    ),
]
DataDirs = Annotated[
    Optional[list[str]],
    typer.Option(
        "--data-dir",
        help="A data directory to protect and watch (repeatable). "
        "Env: PGOOM_DATA_DIR, colon-separated.",
    ),
]
ChildrenScore = Annotated[
    Optional[int],
    typer.Option(
        "--children-score",
        envvar="PGOOM_CHILDREN_SCORE",
        help="Also set each new child of a protected postmaster to this score.",
    ),
]


@app.command()
def watch(
    ctx: typer.Context,
    source: Annotated[
        str, typer.Option("--source", envvar="PGOOM_SOURCE", help="auto|netlink|inotify|poll")
    ] = "auto",
    score: Score = DEFAULT_SCORE,
    pattern: Patterns = None,
    data_dir: DataDirs = None,
    interval: Annotated[
        float,
        typer.Option(
            "--interval",
            envvar="PGOOM_INTERVAL",
            help="Seconds between scans (poll source; child scans without netlink).",
        ),
    ] = DEFAULT_INTERVAL_S,
    verify_interval: Annotated[
        float,
        typer.Option(
            "--verify-interval",
            envvar="PGOOM_VERIFY_INTERVAL",
            help="Seconds between checks that protected postmasters kept their score.",
        ),
    ] = DEFAULT_VERIFY_INTERVAL_S,
    children_score: ChildrenScore = None,
    all_postmasters: Annotated[
        bool,
        typer.Option(
            "--all",
            envvar="PGOOM_ALL",
            help="Protect every verified postmaster, whatever its command line.",
        ),
    ] = False,
    fallback: Annotated[
        Optional[bool],
        typer.Option(
            "--fallback/--no-fallback",
            envvar="PGOOM_FALLBACK",
            help="When no rule matches any process, protect the postgres process that is the "
            "parent of others, else the only one (the seed's methods b and c). Default: on "
            "with the default pattern, off once --pattern, --data-dir or [[rule]]s are given.",
        ),
    ] = None,
    log_file: Annotated[
        str, typer.Option("--log-file", envvar="PGOOM_LOG_FILE", help="Log file ('' for none).")
    ] = DEFAULT_LOG_FILE,
    log_json: Annotated[
        bool, typer.Option("--log-json", envvar="PGOOM_LOG_JSON", help="Log JSON lines.")
    ] = False,
    log_level: Annotated[str, typer.Option("--log-level", envvar="PGOOM_LOG_LEVEL")] = "INFO",
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", envvar="PGOOM_DRY_RUN", help="Log what would change; write nothing."
        ),
    ] = False,
    rcvbuf: Annotated[
        int,
        typer.Option("--rcvbuf", envvar="PGOOM_RCVBUF", help="Netlink receive buffer in bytes."),
    ] = DEFAULT_RCVBUF_BYTES,
    realtime: Annotated[
        bool,
        typer.Option(
            "--realtime",
            envvar="PGOOM_REALTIME",
            help="Run at SCHED_FIFO priority 1 (needs CAP_SYS_NICE): a starting postmaster "
            "then never waits behind other tasks for its protection.",
        ),
    ] = False,
    group_kill: Annotated[
        str,
        typer.Option(
            "--group-kill",
            envvar="PGOOM_GROUP_KILL",
            help="auto|ungroup|keep: where the postmaster's memory cgroup kills as a group "
            "(cgroup v2 memory.oom.group=1, kubelet 1.28+), auto protects with -1000 and keeps "
            "its children off -1000; ungroup writes 0 to that cgroup's memory.oom.group and "
            "keeps --score; keep changes nothing (it will not survive a group kill).",
        ),
    ] = "auto",
    metrics_address: Annotated[
        str,
        typer.Option(
            "--metrics-address",
            envvar="PGOOM_METRICS_ADDRESS",
            help="Serve Prometheus metrics on HOST:PORT (e.g. 127.0.0.1:9187). Default: off.",
        ),
    ] = "",
    config: Annotated[
        Optional[str],
        typer.Option(
            "--config",
            envvar="PGOOM_CONFIG",
            help=f"TOML rules file (default {DEFAULT_CONFIG_PATH} if it exists; '' for none). "
            "Options and PGOOM_* variables override it.",
        ),
    ] = None,
) -> None:
    """Protect postmasters as they start, and keep them protected."""
    from watcher.config_file import resolve
    from watcher.watch import run_watch

    try:
        resolved = resolve(watch_params(ctx), explicit_params(ctx))
        run_watch(resolved.settings, resolved.metrics_address, resolved.notes)
    except PgoomError as err:
        _fail(err)


def watch_params(ctx: typer.Context) -> dict[str, Any]:
    """The parsed options, with the list options' env vars read."""
    params = dict(ctx.params)
    params["pattern"] = _env_list(params.get("pattern"), "PGOOM_PATTERN", "\n")
    params["data_dir"] = _env_list(params.get("data_dir"), "PGOOM_DATA_DIR", ":")
    return params


def explicit_params(ctx: typer.Context) -> set[str]:
    """Parameters given on the command line or through their PGOOM_* variable: these win
    over the config file."""
    given = {"COMMANDLINE", "ENVIRONMENT"}  # click's ParameterSource names
    found = set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in given:
            found.add(name)
    return found


@app.command()
def adjust(
    pid: Annotated[int, typer.Argument(help="The postmaster's PID.")],
    score: Score = DEFAULT_SCORE,
    force: Annotated[bool, typer.Option("--force", help="Skip the identity checks.")] = False,
) -> None:
    """Set one process's oom_score_adj once (like choom), after the identity checks."""
    from watcher.oneshot import adjust_once

    try:
        typer.echo(adjust_once(pid, score, force))
    except PgoomError as err:
        _fail(err)


@app.command()
def status(
    json_output: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
    pattern: Patterns = None,
    score: Score = DEFAULT_SCORE,
) -> None:
    """Show postgres processes, their roles and scores, and whether postmasters are protected."""
    from watcher.status import render, snapshot

    try:
        rows = snapshot(_env_list(pattern, "PGOOM_PATTERN", "\n"), score)
    except PgoomError as err:
        _fail(err)
    typer.echo(render(rows, json_output))


@app.command()
def doctor(
    json_output: Annotated[bool, typer.Option("--json", help="JSON instead of text.")] = False,
    score: Score = DEFAULT_SCORE,
) -> None:
    """Check this host or container: kernel, namespaces, capabilities, floors, cgroups."""
    from watcher.doctor import render, run_checks, worst_exit_code

    results = run_checks(score)
    typer.echo(render(results, json_output))
    raise typer.Exit(worst_exit_code(results))


@app.command()
def verify(
    score: Score = DEFAULT_SCORE,
    pattern: Patterns = None,
    data_dir: DataDirs = None,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout", envvar="PGOOM_VERIFY_TIMEOUT", help="Seconds to wait for protection."
        ),
    ] = 10.0,
    json_output: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Exit 0 when every postmaster is at or below --score within --timeout."""
    from watcher.verify import verify_postmasters

    try:
        code, text = verify_postmasters(
            _env_list(pattern, "PGOOM_PATTERN", "\n"),
            _env_list(data_dir, "PGOOM_DATA_DIR", ":"),
            score,
            timeout,
            json_output,
        )
    except PgoomError as err:
        _fail(err)
    typer.echo(text, err=code != 0 and not json_output)
    raise typer.Exit(code)


@app.command(
    name="exec",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def exec_(ctx: typer.Context) -> None:
    """Container entrypoint: pgoom exec [--user U] [--score N] [--children-score N]
    [--no-watch] -- CMD [ARGS...]. (Dispatched before this parser; see watcher.main.)"""
    from watcher.entrypoint import main as exec_main

    raise typer.Exit(exec_main(list(ctx.args)))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pgoom {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """pgoom: keeps the postmaster from being chosen by the kernel's OOM killer."""


def _click_errors() -> tuple[Any, Any, Any]:
    """(UsageError, ClickException, Abort) of the click typer uses: newer typer vendors click
    as typer._click (with Abort in typer.exceptions), the typer that still supports Python
    3.9 uses click itself. Loaded by name so that mypy (target 3.9) does not parse click's
    3.10-only sources."""
    try:
        vendored = importlib.import_module("typer._click.exceptions")
        abort = importlib.import_module("typer.exceptions").Abort
    except (ImportError, AttributeError):
        plain = importlib.import_module("click.exceptions")
        return plain.UsageError, plain.ClickException, plain.Abort
    return vendored.UsageError, vendored.ClickException, abort


def run() -> None:
    # standalone_mode=False: click's own usage errors (a non-integer --score, an unknown
    # option) come back as exceptions, so they become one `pgoom:` line like ours instead of
    # typer's multi-line box.
    usage_error, click_exception, abort = _click_errors()
    try:
        code = app(standalone_mode=False)
    except usage_error as err:
        command = (
            err.ctx.command_path.replace(err.ctx.find_root().info_name, "pgoom", 1)
            if err.ctx is not None
            else "pgoom"
        )
        print(f"pgoom: {err.format_message()} (see '{command} --help')", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except click_exception as err:
        print(f"pgoom: {err.format_message()}", file=sys.stderr)
        sys.exit(err.exit_code)
    except abort:  # Ctrl-C while click waits for input
        sys.exit(130)
    except PgoomError as err:  # anything a command forgot to map
        print(f"pgoom: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
