"""`pgoom exec` without root: option parsing, user resolution, the environment for the
switched user, and the promise that the start path imports nothing heavy."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys

import pytest

from watcher.exec.entrypoint import Usage, parse_args
from watcher.exec.privileges import Account, PrivilegeError, resolve_user, user_environment
from watcher.exec.supervisor import monitor_argv
from watcher.limits import DEFAULT_SCORE

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON39 = "/root/.pyenv/versions/3.9.18/bin/python3.9"


def test_defaults() -> None:
    opts = parse_args(["patroni", "/etc/patroni"], {})
    assert opts.user == "26"
    assert opts.score == DEFAULT_SCORE == -900
    assert opts.children_score == 0 and not opts.children_score_given
    assert opts.watch
    assert opts.data_dirs == []
    assert opts.command == ["patroni", "/etc/patroni"]


def test_options_stop_at_double_dash_or_first_word() -> None:
    opts = parse_args(["--score=-500", "--user", "postgres", "--", "--not-ours", "x"], {})
    assert (opts.score, opts.user, opts.command) == (-500, "postgres", ["--not-ours", "x"])
    opts = parse_args(["--no-watch", "postgres", "--score", "1"], {})
    assert not opts.watch
    assert opts.command == ["postgres", "--score", "1"]


def test_environment_gives_defaults_and_the_command_line_wins() -> None:
    env = {
        "PGOOM_USER": "99",
        "PGOOM_SCORE": "-100",
        "PGOOM_CHILDREN_SCORE": "200",
        "PGOOM_NO_WATCH": "1",
        "PGOOM_DATA_DIR": "/a:/b",
        "PGDATA": "/ignored",
    }
    opts = parse_args(["cmd"], env)
    assert (opts.user, opts.score, opts.children_score) == ("99", -100, 200)
    assert opts.children_score_given and not opts.watch
    assert opts.data_dirs == ["/a", "/b"]
    opts = parse_args(["--score", "5", "--data-dir", "/c", "cmd"], env)
    assert opts.score == 5 and opts.data_dirs == ["/c"]


def test_pgdata_is_the_data_dir_when_none_is_given() -> None:
    assert parse_args(["cmd"], {"PGDATA": "/pgdata/pg16"}).data_dirs == ["/pgdata/pg16"]


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {}, "no command given"),
        (["--"], {}, "no command given"),
        (["--score", "abc", "cmd"], {}, "--score 'abc' is not a number"),
        (["--score", "-1001", "cmd"], {}, "--score -1001 is out of range"),
        (["--children-score", "2000", "cmd"], {}, "--children-score 2000 is out of range"),
        (["cmd"], {"PGOOM_SCORE": "x"}, "PGOOM_SCORE 'x' is not a number"),
        (["--frobnicate", "cmd"], {}, "unknown option --frobnicate"),
        (["--user"], {}, "--user needs a value"),
        (["--data-dir", "pgdata", "cmd"], {}, "must be an absolute path"),
    ],
)
def test_bad_usage_says_what_to_fix(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(Usage, match=message.replace("(", r"\(")):
        parse_args(argv, env)


def test_resolve_user_by_name_and_number() -> None:
    root = resolve_user("root")
    assert (root.uid, root.gid, root.name, root.home) == (0, 0, "root", "/root")
    assert 0 in root.groups
    assert resolve_user("0").name == "root"


def test_resolve_unknown_uid_like_docker() -> None:
    free = next(uid for uid in range(4242, 5000) if not _has_passwd(uid))
    account = resolve_user(str(free))
    assert (account.uid, account.gid, account.name, account.home) == (free, 0, None, "/")
    assert account.groups == ()
    assert resolve_user(f"{free}:77").gid == 77
    assert resolve_user(f"{free}:77").groups == (77,)


def _has_passwd(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def test_resolve_group_by_name() -> None:
    assert resolve_user("root:root").gid == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-user-pgoom", "no such user"),
        ("root:no-such-group-pgoom", "no such group"),
        ("", "give a user name or number"),
        (":0", "give a user name or number"),
    ],
)
def test_resolve_errors(spec: str, message: str) -> None:
    with pytest.raises(PrivilegeError, match=message):
        resolve_user(spec)


def test_user_environment_like_runuser() -> None:
    env = {"HOME": "/root", "USER": "root", "LOGNAME": "root", "PATH": "/bin"}
    named = user_environment(Account(26, 26, "postgres", "/var/lib/pgsql", (26,)), env)
    assert named == {"HOME": "/var/lib/pgsql", "USER": "postgres", "LOGNAME": "postgres",
                     "PATH": "/bin"}  # fmt: skip
    nameless = user_environment(Account(4242, 0, None, "/", ()), env)
    assert nameless == {"HOME": "/", "PATH": "/bin"}
    assert env["HOME"] == "/root"  # the input is not changed


def test_monitor_runs_isolated_on_the_same_interpreter() -> None:
    argv = monitor_argv(["watch", "--score", "-900"])
    assert argv[:3] == [sys.executable, "-I", "-c"]
    assert repr(REPO) in argv[3]
    assert argv[4:] == ["watch", "--score", "-900"]


HEAVY = ("typer", "click", "loguru", "psutil", "pyroute2", "rich", "watcher.engine")


def _imports_of_exec(python: str) -> set[str]:
    """Modules imported by `pgoom exec --no-watch -- true`, as the non-root path runs it
    (root would switch to uid 26: same imports)."""
    done = subprocess.run(
        [python, "-X", "importtime", "-c",
         f"import sys; sys.path.insert(0, {REPO!r}); "
         "sys.argv = ['pgoom', 'exec', '--no-watch', '--user', str(__import__('os').getuid()), "
         "'--', 'true']; from watcher.main import main; main()"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return {
        line.split("|")[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }


def test_exec_path_imports_nothing_heavy() -> None:
    modules = _imports_of_exec(sys.executable)
    assert "watcher.exec.entrypoint" in modules
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY or m in HEAVY)
    assert heavy == []
    assert "dataclasses" not in modules  # ~10 ms with inspect and ast


@pytest.mark.skipif(not os.path.exists(PYTHON39), reason="no Python 3.9 interpreter here")
def test_exec_path_runs_on_python_39() -> None:
    """The Percona base's python3 is 3.9: the start path must run there on the stdlib."""
    modules = _imports_of_exec(PYTHON39)
    assert "watcher.exec.privileges" in modules
