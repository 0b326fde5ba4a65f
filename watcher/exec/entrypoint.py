"""`pgoom exec [OPTIONS] [--] CMD [ARGS...]`: the container entrypoint, tini-style.

    1. resolve the user to run CMD as (root only)
    2. lower our own oom_score_adj to the target, so everything started from here inherits it
    3. export PG_OOM_ADJUST_FILE / PG_OOM_ADJUST_VALUE unless already set
    4. start the monitor (`pgoom watch` under a small supervisor, least privilege)
    5. switch to the user
    6. exec CMD: same PID, same argv, CMD becomes the main process as without pgoom

pgoom must never keep the database from starting: whatever the environment refuses in steps
2-4 becomes a warning on stderr and the start goes on. Only what would make CMD run as
someone else than asked stops it (unknown --user, a switch the kernel refuses), and a bad
command line (exit 2, as everywhere in pgoom). Exec failures: 127 not found, 126 not
executable.

This module runs on the database's start path, dispatched by watcher.main before typer,
loguru, psutil or pyroute2 are imported: it uses the standard library only, and as little
of it as it can (measured in docs/benchmarks.md, "exec path of `pgoom exec`").
"""

from __future__ import annotations

import os
import signal
import sys

from watcher.exec.privileges import (
    Account,
    PrivilegeError,
    resolve_user,
    switch_user,
    user_environment,
)
from watcher.limits import (
    DEFAULT_CHILDREN_SCORE,
    DEFAULT_SCORE,
    EXIT_CANNOT_EXECUTE,
    EXIT_COMMAND_NOT_FOUND,
    EXIT_DENIED,
    EXIT_USAGE,
    data_dir_problem,
    score_problem,
)

DEFAULT_USER = "26"  # the Percona image's postgres
# Set for CMD: the patroni shim (docker/patroni) sees it and does not wrap a second time.
WRAPPED_ENV = "PGOOM_WRAPPED"

USAGE = """\
usage: pgoom exec [--user U] [--score N] [--children-score N] [--data-dir D] [--no-watch]
                  [--] CMD [ARGS...]

Lower the oom_score_adj of everything CMD starts, export PG_OOM_ADJUST_FILE/VALUE, start
the monitor (`pgoom watch`), switch to the user and exec CMD (it keeps this PID).

  --user U            name, uid, name:group or uid:gid (env PGOOM_USER; default 26)
  --score N           oom_score_adj for CMD and the postmaster (env PGOOM_SCORE; -900)
  --children-score N  PG_OOM_ADJUST_VALUE, the postmaster's children's score; also given to
                      the monitor when set (env PGOOM_CHILDREN_SCORE; default 0)
  --data-dir D        data directory for the monitor (env PGOOM_DATA_DIR, else PGDATA)
  --no-watch          do not start the monitor (env PGOOM_NO_WATCH=1)

Root-only steps (score, monitor, user switch) are skipped when not root.
Exit: CMD's own status; 127 CMD not found, 126 not executable, 2 bad usage,
4 the user switch was refused.
"""


class Usage(Exception):
    pass


class Options:
    """What the command line and the PGOOM_* environment asked for."""

    def __init__(self) -> None:
        self.user = DEFAULT_USER
        self.score = DEFAULT_SCORE
        self.children_score = DEFAULT_CHILDREN_SCORE
        self.children_score_given = False
        self.data_dirs: list[str] = []
        self.watch = True
        self.command: list[str] = []


def warn(message: str) -> None:
    sys.stderr.write(f"pgoom: warning: {message}\n")
    sys.stderr.flush()


def _score(text: str, option: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise Usage(f"{option} {text!r} is not a number: give -1000..1000") from None
    problem = score_problem(value)
    if problem:
        raise Usage(f"{option} {problem}")
    return value


def parse_args(argv: list[str], env: dict[str, str]) -> Options:
    """Options up to `--` or the first word that is not one (CMD may have options of its
    own); the environment gives the defaults, the command line wins."""
    opts = Options()
    opts.user = env.get("PGOOM_USER") or DEFAULT_USER
    if env.get("PGOOM_SCORE"):
        opts.score = _score(env["PGOOM_SCORE"], "PGOOM_SCORE")
    if env.get("PGOOM_CHILDREN_SCORE"):
        opts.children_score = _score(env["PGOOM_CHILDREN_SCORE"], "PGOOM_CHILDREN_SCORE")
        opts.children_score_given = True
    opts.data_dirs = [d for d in env.get("PGOOM_DATA_DIR", "").split(":") if d]
    opts.watch = env.get("PGOOM_NO_WATCH", "").lower() not in ("1", "true", "yes")
    cli_dirs: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            index += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        name, has_value, value = arg.partition("=")
        if name in ("-h", "--help"):
            raise Usage("")
        if name == "--no-watch":
            opts.watch = False
            index += 1
            continue
        if name not in ("--user", "--score", "--children-score", "--data-dir"):
            raise Usage(f"unknown option {name}: see pgoom exec --help")
        if not has_value:
            if index + 1 >= len(argv):
                raise Usage(f"{name} needs a value")
            index += 1
            value = argv[index]
        if name == "--user":
            opts.user = value
        elif name == "--score":
            opts.score = _score(value, name)
        elif name == "--children-score":
            opts.children_score = _score(value, name)
            opts.children_score_given = True
        else:
            cli_dirs.append(value)
        index += 1
    if cli_dirs:
        opts.data_dirs = cli_dirs
    if not opts.data_dirs and env.get("PGDATA"):
        opts.data_dirs = [env["PGDATA"]]
    for path in opts.data_dirs:
        problem = data_dir_problem(path)
        if problem:
            raise Usage(f"--data-dir {problem}")
    opts.command = argv[index:]
    if not opts.command:
        raise Usage("no command given: pgoom exec [OPTIONS] -- CMD [ARGS...]")
    return opts


# ------------------------------------------------------------------------------- the steps


def resolve_target(opts: Options) -> Account | None:
    """The account to switch to, or None when CMD should keep our identity."""
    account = resolve_user(opts.user)
    return None if account.uid == os.getuid() else account


def lower_own_score(score: int) -> None:
    """Everything started from here inherits the value. Only ever lower: a Guaranteed pod's
    -997 must not become -900."""
    path = "/proc/self/oom_score_adj"
    current: int | str = "unknown"
    try:
        with open(path) as f:
            current = int(f.read())
        if current <= score:
            return
        with open(path, "w") as f:
            f.write(str(score))
    except OSError as err:
        warn(
            f"cannot set oom_score_adj to {score} ({err.strerror}; it stays {current}): "
            "give the container CAP_SYS_RESOURCE (docker run --cap-add SYS_RESOURCE; in "
            "Kubernetes securityContext.capabilities.add: [SYS_RESOURCE]) or, where that is "
            "not possible, protect the postmaster from a sidecar (docs/kubernetes.md)"
        )


def export_oom_env(children_score: int) -> None:
    """PostgreSQL's children write PG_OOM_ADJUST_VALUE to PG_OOM_ADJUST_FILE right after
    fork: the postmaster stays protected, backends become fair OOM victims again. A value
    the operator already set wins."""
    os.environ.setdefault("PG_OOM_ADJUST_FILE", "/proc/self/oom_score_adj")
    os.environ.setdefault("PG_OOM_ADJUST_VALUE", str(children_score))


def start_monitor(opts: Options) -> None:
    from watcher.exec.supervisor import launch

    args = ["watch", "--score", str(opts.score)]
    if opts.children_score_given:
        args += ["--children-score", str(opts.children_score)]
    for path in opts.data_dirs:
        args += ["--data-dir", path]
    launch(args)


def switch_to(account: Account) -> None:
    switch_user(account)
    env = user_environment(account, dict(os.environ))
    for name in ("HOME", "USER", "LOGNAME"):
        if name in env:
            os.environ[name] = env[name]
        else:
            os.environ.pop(name, None)


def exec_command(command: list[str]) -> int:
    """Replace this process with CMD. Returns only on failure, with tini's codes."""
    # Python ignores SIGPIPE and SIGXFSZ; an ignored disposition survives exec and would
    # change how CMD behaves (a shell pipeline would no longer end on EPIPE).
    for signo in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(signo, signal.SIG_DFL)
    os.environ[WRAPPED_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(command[0], command)
    except (FileNotFoundError, NotADirectoryError):
        sys.stderr.write(f"pgoom: {command[0]}: command not found\n")
        return EXIT_COMMAND_NOT_FOUND
    except OSError as err:
        sys.stderr.write(f"pgoom: {command[0]}: cannot execute: {err.strerror}\n")
        return EXIT_CANNOT_EXECUTE
    return EXIT_CANNOT_EXECUTE  # not reached: execvp returns only by raising


def main(argv: list[str]) -> int:
    try:
        opts = parse_args(argv, dict(os.environ))
    except Usage as err:
        if str(err):
            sys.stderr.write(f"pgoom: {err}\n")
            return EXIT_USAGE
        sys.stdout.write(USAGE)
        return 0
    is_root = os.geteuid() == 0
    account: Account | None = None
    if is_root:
        try:
            account = resolve_target(opts)
        except PrivilegeError as err:
            sys.stderr.write(f"pgoom: {err}\n")
            return EXIT_USAGE
        lower_own_score(opts.score)
    else:
        sys.stderr.write(
            f"pgoom: not running as root (uid {os.geteuid()}): not lowering oom_score_adj, "
            "no monitor, no user switch; protect the postmaster from a sidecar or run the "
            "container as root with CAP_SYS_RESOURCE (docs/container.md)\n"
        )
    export_oom_env(opts.children_score)
    if is_root and opts.watch:
        try:
            start_monitor(opts)
        except Exception as err:  # never keep the database from starting
            warn(f"monitor not started: {err}")
    if account is not None:
        try:
            switch_to(account)
        except PrivilegeError as err:
            sys.stderr.write(f"pgoom: {err}\n")
            return EXIT_DENIED
    return exec_command(opts.command)
