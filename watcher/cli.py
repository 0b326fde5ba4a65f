"""The typer layer: parse options, call the engine and the plain modules, map errors to exit
codes. No logic lives here. Every option has a PGOOM_* environment variable."""

# No `from __future__ import annotations` here: typer before 0.24 (the newest on Python 3.9,
# the Percona image's python3) reads string annotations through get_type_hints() without
# extras, which drops every Annotated option declaration and its PGOOM_* env var.
import importlib
import os
import sys
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from watcher import __version__, options
from watcher.commands import SUMMARY
from watcher.errors import PgoomError
from watcher.limits import DEFAULT_SCORE, EXIT_USAGE
from watcher.options import Option

if TYPE_CHECKING:
    from watcher.config_file import WatchArgs

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Keep the PostgreSQL postmaster out of the OOM killer's reach.",
    pretty_exceptions_enable=False,
)


def _option(option: Option[Any]) -> Any:
    """The typer option of a declaration in watcher.options. A repeatable option reads its
    variable itself (options.env_list: an explicit separator), so typer is not told it."""
    env = option.env if option.env and not option.separator else None
    return typer.Option(option.flag, envvar=env, help=option.help)


def _fail(err: PgoomError) -> None:
    typer.echo(f"pgoom: {err}", err=True)
    raise typer.Exit(err.exit_code)


Score = Annotated[int, _option(options.SCORE)]
Patterns = Annotated[Optional[list[str]], _option(options.PATTERN)]
DataDirs = Annotated[Optional[list[str]], _option(options.DATA_DIR)]


@app.command(help=SUMMARY["watch"])
def watch(
    ctx: typer.Context,
    source: Annotated[str, _option(options.SOURCE)] = options.SOURCE.default,
    score: Score = DEFAULT_SCORE,
    pattern: Patterns = None,
    data_dir: DataDirs = None,
    interval: Annotated[float, _option(options.INTERVAL)] = options.INTERVAL.default,
    verify_interval: Annotated[
        float, _option(options.VERIFY_INTERVAL)
    ] = options.VERIFY_INTERVAL.default,
    children_score: Annotated[Optional[int], _option(options.CHILDREN_SCORE)] = None,
    all_postmasters: Annotated[bool, _option(options.ALL)] = False,
    fallback: Annotated[Optional[bool], _option(options.FALLBACK)] = None,
    log_file: Annotated[str, _option(options.LOG_FILE)] = options.LOG_FILE.default,
    log_json: Annotated[bool, _option(options.LOG_JSON)] = False,
    log_level: Annotated[str, _option(options.LOG_LEVEL)] = options.LOG_LEVEL.default,
    dry_run: Annotated[bool, _option(options.DRY_RUN)] = False,
    rcvbuf: Annotated[int, _option(options.RCVBUF)] = options.RCVBUF.default,
    realtime: Annotated[bool, _option(options.REALTIME)] = False,
    group_kill: Annotated[str, _option(options.GROUP_KILL)] = options.GROUP_KILL.default,
    metrics_address: Annotated[
        str, _option(options.METRICS_ADDRESS)
    ] = options.METRICS_ADDRESS.default,
    config: Annotated[Optional[str], _option(options.CONFIG)] = None,
) -> None:
    from watcher.commands.watch import run_watch
    from watcher.config_file import resolve

    try:
        resolved = resolve(watch_args(ctx))
        run_watch(resolved.settings, resolved.metrics_address, resolved.notes)
    except PgoomError as err:
        _fail(err)


def watch_args(ctx: typer.Context) -> "WatchArgs":
    """The parsed options of `pgoom watch` as a typed WatchArgs (watcher.config_file), with
    the repeatable options' variables read and the explicitly given options named."""
    from watcher.config_file import WatchArgs

    p = ctx.params
    given = {"COMMANDLINE", "ENVIRONMENT"}  # click's ParameterSource names
    explicit = set()
    for name in p:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in given:
            explicit.add("all" if name == "all_postmasters" else name)
    patterns = options.env_list(p["pattern"], options.PATTERN, dict(os.environ))
    data_dirs = options.env_list(p["data_dir"], options.DATA_DIR, dict(os.environ))
    if patterns:
        explicit.add("pattern")
    if data_dirs:
        explicit.add("data_dir")
    return WatchArgs(
        source=p["source"],
        score=p["score"],
        patterns=patterns,
        data_dirs=data_dirs,
        interval_s=p["interval"],
        verify_interval_s=p["verify_interval"],
        children_score=p["children_score"],
        match_all=p["all_postmasters"],
        fallback=p["fallback"],
        log_file=p["log_file"],
        log_json=p["log_json"],
        log_level=p["log_level"],
        dry_run=p["dry_run"],
        rcvbuf_bytes=p["rcvbuf"],
        realtime=p["realtime"],
        group_kill=p["group_kill"],
        metrics_address=p["metrics_address"],
        config=p["config"],
        explicit=frozenset(explicit),
    )


@app.command(help=SUMMARY["adjust"])
def adjust(
    pid: Annotated[int, typer.Argument(help="The postmaster's PID.")],
    score: Score = DEFAULT_SCORE,
    force: Annotated[bool, typer.Option("--force", help="Skip the identity checks.")] = False,
) -> None:
    from watcher.commands.adjust import adjust_once

    try:
        typer.echo(adjust_once(pid, score, force))
    except PgoomError as err:
        _fail(err)


@app.command(help=SUMMARY["status"])
def status(
    json_output: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
    pattern: Patterns = None,
    score: Score = DEFAULT_SCORE,
) -> None:
    from watcher.commands.status import render, snapshot

    try:
        rows = snapshot(options.env_list(pattern, options.PATTERN, dict(os.environ)), score)
    except PgoomError as err:
        _fail(err)
    typer.echo(render(rows, json_output))


@app.command(help=SUMMARY["doctor"])
def doctor(
    json_output: Annotated[bool, typer.Option("--json", help="JSON instead of text.")] = False,
    score: Score = DEFAULT_SCORE,
) -> None:
    from watcher.commands.doctor import run_checks
    from watcher.commands.doctor.checks import render, worst_exit_code

    results = run_checks(score)
    typer.echo(render(results, json_output))
    raise typer.Exit(worst_exit_code(results))


@app.command(help=SUMMARY["verify"])
def verify(
    score: Score = DEFAULT_SCORE,
    pattern: Patterns = None,
    data_dir: DataDirs = None,
    timeout: Annotated[float, _option(options.VERIFY_TIMEOUT)] = options.VERIFY_TIMEOUT.default,
    json_output: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    from watcher.commands.verify import verify_postmasters

    try:
        code, text = verify_postmasters(
            options.env_list(pattern, options.PATTERN, dict(os.environ)),
            options.env_list(data_dir, options.DATA_DIR, dict(os.environ)),
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
    help=SUMMARY["exec"]
    + " Usage: pgoom exec [--user U] [--score N] [--children-score N] [--no-watch] -- CMD"
    " [ARGS...] (parsed before typer: see watcher.main).",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def exec_(ctx: typer.Context) -> None:
    # Reached only through typer (e.g. --help); watcher.main dispatches `pgoom exec` first.
    from watcher.exec.entrypoint import main as exec_main

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
