"""`pgoom exec` must never fail to start the database because of pgoom, and a local user
must not be able to switch its monitor off (issue 9, items 7 and 8). Real processes, as
root and as uid 26 / 65534; the monitor runs dry (PGOOM_DRY_RUN) with a source that touches
nothing of other tests.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from typing import Optional

import pytest

from tests.integration.test_entrypoint import base_env
from tests.support.pg import ensure_pg_user, wait_for

pytestmark = pytest.mark.root

PGOOM_EXEC = [sys.executable, "-m", "watcher", "exec"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOBODY = 65534


def env_for(work: str, **extra: str) -> dict[str, str]:
    """test_entrypoint's environment, with a pattern that matches no postmaster."""
    return base_env(work, **{"PGOOM_PATTERN": "^no-such-postmaster$", **extra})


def as_uid(uid: Optional[int]) -> Optional[Callable[[], None]]:
    if uid is None:
        return None

    def drop() -> None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)

    return drop


def run(
    work: str,
    args: list[str],
    uid: Optional[int] = None,
    shell_redirect: str = "",
    env: Optional[dict[str, str]] = None,
    pgoom: Optional[list[str]] = None,
) -> subprocess.CompletedProcess[str]:
    argv = [*(pgoom or PGOOM_EXEC), *args]
    if shell_redirect:
        argv = ["sh", "-c", f"exec {shlex.join(argv)} {shell_redirect}"]
    return subprocess.run(
        argv,
        check=False,
        env=env or env_for(work),
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=as_uid(uid),
        cwd="/",
        stdin=subprocess.DEVNULL,
    )


def one_pgoom_line(done: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert done.returncode == code, done.stderr
    lines = [x for x in done.stderr.splitlines() if x]
    assert len(lines) == 1 and lines[0].startswith("pgoom: "), done.stderr
    assert needle in lines[0], done.stderr
    assert "Traceback" not in done.stderr


# --- item 8: pgoom never keeps CMD from starting -------------------------------------------


def _stdlib_unreadable_by_26() -> bool:
    probe = subprocess.run(
        ["test", "-r", os.path.dirname(os.__file__)], preexec_fn=as_uid(26), check=False
    )
    return bool(probe.returncode != 0)


def test_path_search_after_the_switch_needs_nothing_the_new_user_cannot_read(work: str) -> None:
    # On main: `ModuleNotFoundError: No module named 'warnings'` from os.execvp's PATH
    # search, imported lazily after the switch to uid 26, with the interpreter under /root.
    ensure_pg_user()
    if not _stdlib_unreadable_by_26():
        pytest.skip("this interpreter's standard library is readable by uid 26")
    marker = os.path.join(work, "ran")
    done = run(work, ["--user", "26", "--no-watch", "--", "sh", "-c", f"id -u > {marker}"])
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    with open(marker) as f:
        assert f.read().strip() == "26"


@pytest.mark.parametrize("closed", [">&-", "2>&-", ">&- 2>&-"])
def test_exec_with_stdout_or_stderr_closed_still_runs_cmd(work: str, closed: str) -> None:
    # On main: AttributeError on sys.stdout.flush(); the command never ran.
    marker = os.path.join(work, "ran")
    done = run(
        work, ["--no-watch", "--", "sh", "-c", f"echo ran > {marker}"], shell_redirect=closed
    )
    assert done.returncode == 0, done.stderr
    assert os.path.exists(marker)


def test_exec_with_stderr_closed_still_starts_the_monitor_and_cmd(work: str) -> None:
    marker = os.path.join(work, "ran")
    done = run(work, ["--", "sh", "-c", f"echo ran > {marker}"], shell_redirect="2>&-")
    assert done.returncode == 0, done.stderr
    assert os.path.exists(marker)


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--", ""], 2, "empty"),
        (["--user", "99999999999", "--", "true"], 2, "--user 99999999999"),
        (["--user", "26:99999999999", "--", "true"], 2, "99999999999"),
        (["--user", "4294967295", "--", "true"], 2, "--user 4294967295"),
    ],
)
def test_bad_commands_and_ids_are_one_line_and_exit_2(
    work: str, args: list[str], code: int, needle: str
) -> None:
    one_pgoom_line(run(work, ["--no-watch", *args]), code, needle)


def _system_pgoom() -> list[str]:
    # uid 26 / nobody cannot reach the venv's interpreter under /root; the exec path needs
    # the standard library only, so the system python3 runs it from the source tree.
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("no /usr/bin/python3")
    return ["/usr/bin/python3", "-m", "watcher", "exec"]


def test_not_root_asking_for_another_user_is_refused_like_a_refused_switch(work: str) -> None:
    # On main it was silently ignored: CMD ran as uid 26 though --user 0 was asked for.
    ensure_pg_user()
    marker = os.path.join(work, "ran")
    done = run(work, ["--user", "0", "--", "touch", marker], uid=26, pgoom=_system_pgoom())
    assert done.returncode == 4, done.stderr
    assert "--user 0" in done.stderr and "Traceback" not in done.stderr
    assert not os.path.exists(marker)


def test_not_root_asking_for_an_unknown_user_is_exit_2_as_for_root(work: str) -> None:
    ensure_pg_user()
    marker = os.path.join(work, "ran")
    done = run(
        work,
        ["--user", "no-such-user-pgoom", "--", "touch", marker],
        uid=26,
        pgoom=_system_pgoom(),
    )
    assert done.returncode == 2, done.stderr
    assert "no such user" in done.stderr
    assert not os.path.exists(marker)


def test_not_root_as_the_asked_user_runs_cmd(work: str) -> None:
    ensure_pg_user()
    marker = os.path.join(work, "ran")
    done = run(work, ["--user", "26", "--", "touch", marker], uid=26, pgoom=_system_pgoom())
    assert done.returncode == 0, done.stderr
    assert os.path.exists(marker)


# --- item 7: the monitor lock ----------------------------------------------------------------


def _monitor_started(stderr: str) -> bool:
    return "watching with source" in stderr


def _exec_until_monitor(work: str, env: dict[str, str]) -> str:
    """`pgoom exec -- sleep` until its monitor reports ready; returns the stderr so far."""
    err_path = os.path.join(work, "stderr")
    with open(err_path, "w") as err:
        proc = subprocess.Popen([*PGOOM_EXEC, "--", "sleep", "60"], env=env, stderr=err, cwd="/")
    try:
        wait_for(lambda: _monitor_started(open(err_path).read()), 30, what="the monitor to start")
        return open(err_path).read()
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_planted_and_flocked_by_another_user_does_not_switch_the_monitor_off(
    work: str,
) -> None:
    # On main: "a monitor already runs in this container": protection silently off.
    lock = os.path.join(work, "planted.lock")
    holder = subprocess.Popen(
        [
            "/usr/bin/python3",  # nobody cannot reach the venv's interpreter under /root
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({lock!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(120)\n",
        ],
        preexec_fn=as_uid(NOBODY),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert os.stat(lock).st_uid == NOBODY
        text = _exec_until_monitor(work, env_for(work, PGOOM_MONITOR_LOCK=lock))
        assert "belongs to uid 65534" in text
        assert os.stat(lock).st_uid == NOBODY  # not taken over, not written
    finally:
        holder.kill()
        holder.wait()


def test_a_symlink_planted_at_the_lock_path_is_not_followed(work: str) -> None:
    target = os.path.join(work, "victim")
    with open(target, "w") as f:
        f.write("keep\n")
    lock = os.path.join(work, "link.lock")
    os.symlink(target, lock)
    os.lchown(lock, NOBODY, NOBODY)
    _exec_until_monitor(work, env_for(work, PGOOM_MONITOR_LOCK=lock))
    with open(target) as f:
        assert f.read() == "keep\n"
    fd = os.open(target, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody took a lock on the victim
    finally:
        os.close(fd)
