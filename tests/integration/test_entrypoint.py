"""`pgoom exec` on the real kernel, as root: the user switch, the environment, CMD's argv,
PID, exit status and signals, and the supervised least-privilege monitor.

The monitor runs with PGOOM_DRY_RUN=1 and its own lock file: these tests look at its
process (capabilities, restarts, zombies), not at what it protects, and it must not touch
the postmasters of tests running beside them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Optional

import pytest

from tests.support.pg import children_of, ensure_pg_user, wait_for
from tests.support.watcher import PGOOM
from watcher.limits import CAP_DAC_OVERRIDE, CAP_SYS_RESOURCE

pytestmark = pytest.mark.root

PGOOM_EXEC = [*PGOOM, "exec"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs as any user: records who it is, what it got and how it was started.
PROBE = r"""
import json, os, sys
status = {}
for line in open("/proc/self/status"):
    key, _, value = line.partition(":")
    status[key] = value.strip()
json.dump({
    "argv": sys.argv[2:],
    "pid": os.getpid(),
    "uid": list(os.getresuid()),
    "gid": list(os.getresgid()),
    "groups": sorted(os.getgroups()),
    "env": dict(os.environ),
    "sigign": status["SigIgn"],
    "score": int(open("/proc/self/oom_score_adj").read()),
}, open(sys.argv[1], "w"))
"""


def base_env(work: str, **extra: str) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": REPO,
        "PGOOM_MONITOR_LOCK": os.path.join(work, "monitor.lock"),
        "PGOOM_LOG_FILE": "",
        "PGOOM_DRY_RUN": "1",
        "PGOOM_SOURCE": "poll",
    }
    env.update(extra)
    return env


def probe_cmd(work: str, *args: str) -> list[str]:
    script = os.path.join(work, "probe.py")
    with open(script, "w") as f:
        f.write(PROBE)
    return ["/usr/bin/python3", "-I", script, os.path.join(work, "probe.json"), *args]


def probe_result(work: str) -> dict[str, object]:
    with open(os.path.join(work, "probe.json")) as f:
        result = json.load(f)
    assert isinstance(result, dict)
    return result


def run_exec(
    work: str,
    options: list[str],
    command: list[str],
    env: Optional[dict[str, str]] = None,
    score: Optional[int] = None,
    uid: Optional[int] = None,
    pgoom: Optional[list[str]] = None,
) -> subprocess.CompletedProcess[str]:
    def prepare() -> None:
        if score is not None:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write(str(score))
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)

    return subprocess.run(
        [*(pgoom or PGOOM_EXEC), *options, "--", *command],
        check=False,
        env=env if env is not None else base_env(work),
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=prepare,
        cwd="/",
    )


@pytest.fixture
def extra_group() -> Iterator[tuple[str, int]]:
    """A supplementary group of the uid-26 test user, removed afterwards."""
    ensure_pg_user()
    name = f"pgoom{uuid.uuid4().hex[:6]}"
    subprocess.run(["groupadd", name], check=True)
    import grp
    import pwd

    subprocess.run(
        ["gpasswd", "-M", pwd.getpwuid(26).pw_name, name], check=True, stdout=subprocess.DEVNULL
    )

    yield name, grp.getgrnam(name).gr_gid
    subprocess.run(["groupdel", name], check=False)


def test_switches_to_named_user_with_groups_and_home(
    work: str, extra_group: tuple[str, int]
) -> None:
    _, extra_gid = extra_group
    import pwd

    entry = pwd.getpwuid(26)
    done = run_exec(work, ["--no-watch", "--user", entry.pw_name], probe_cmd(work))
    assert done.returncode == 0, done.stderr
    got = probe_result(work)
    assert got["uid"] == [26, 26, 26]
    assert got["gid"] == [entry.pw_gid] * 3
    assert extra_gid in got["groups"]  # type: ignore[operator]
    assert got["groups"] == sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid)))
    env = got["env"]
    assert isinstance(env, dict)
    assert env["HOME"] == entry.pw_dir
    assert env["USER"] == env["LOGNAME"] == entry.pw_name


def test_default_user_is_26(work: str) -> None:
    ensure_pg_user()
    done = run_exec(work, ["--no-watch"], probe_cmd(work))
    assert done.returncode == 0, done.stderr
    assert probe_result(work)["uid"] == [26, 26, 26]


def test_uid_without_passwd_entry_gets_gid_0_and_home_slash(work: str) -> None:
    env = base_env(work, USER="root", LOGNAME="root", HOME="/root")
    done = run_exec(work, ["--no-watch", "--user", "4242"], probe_cmd(work), env=env)
    assert done.returncode == 0, done.stderr
    got = probe_result(work)
    assert got["uid"] == [4242] * 3
    assert got["gid"] == [0, 0, 0]
    assert got["groups"] == []
    env_got = got["env"]
    assert isinstance(env_got, dict)
    assert env_got["HOME"] == "/"
    assert "USER" not in env_got and "LOGNAME" not in env_got


def test_unknown_user_stops_before_cmd(work: str) -> None:
    marker = os.path.join(work, "ran")
    done = run_exec(work, ["--user", "no-such-user-pgoom"], ["touch", marker])
    assert done.returncode == 2
    assert done.stderr.startswith("pgoom: --user no-such-user-pgoom: no such user")
    assert not os.path.exists(marker)


def test_oom_env_exported_unless_already_set(work: str) -> None:
    ensure_pg_user()
    done = run_exec(work, ["--no-watch", "--relative-score", "off"], probe_cmd(work))
    assert done.returncode == 0, done.stderr
    env = probe_result(work)["env"]
    assert isinstance(env, dict)
    assert env["PG_OOM_ADJUST_FILE"] == "/proc/self/oom_score_adj"
    assert env["PG_OOM_ADJUST_VALUE"] == "0"

    # By default, where the kernel refuses -900 (no CAP_SYS_RESOURCE, as on this project's
    # test machines), relative protection raises the children above the postmaster instead.
    done = run_exec(work, ["--no-watch"], probe_cmd(work))
    assert done.returncode == 0, done.stderr
    env = probe_result(work)["env"]
    assert isinstance(env, dict)
    with open("/proc/self/status") as f:
        bounding = int(next(x for x in f if x.startswith("CapBnd:")).split()[1], 16)
    can_lower = bool(bounding & (1 << 24))  # CAP_SYS_RESOURCE
    assert env["PG_OOM_ADJUST_VALUE"] == ("0" if can_lower else "1000"), done.stderr
    assert ("relative protection" in done.stderr) is not can_lower

    done = run_exec(work, ["--no-watch", "--children-score", "300"], probe_cmd(work))
    env = probe_result(work)["env"]
    assert isinstance(env, dict)
    assert env["PG_OOM_ADJUST_VALUE"] == "300"

    preset = base_env(work, PG_OOM_ADJUST_FILE="/dev/null", PG_OOM_ADJUST_VALUE="7")
    done = run_exec(work, ["--no-watch", "--children-score", "300"], probe_cmd(work), env=preset)
    assert done.returncode == 0, done.stderr
    env = probe_result(work)["env"]
    assert isinstance(env, dict)
    assert (env["PG_OOM_ADJUST_FILE"], env["PG_OOM_ADJUST_VALUE"]) == ("/dev/null", "7")


def test_argv_pid_and_signal_dispositions_pass_through(work: str) -> None:
    ensure_pg_user()
    args = ["a b", "", "--", "-x", "--user", "ü"]
    proc = subprocess.Popen(
        [*PGOOM_EXEC, "--no-watch", "--", *probe_cmd(work, *args)],
        env=base_env(work),
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    got = probe_result(work)
    assert got["argv"] == args
    assert got["pid"] == proc.pid  # exec'd, not spawned


def test_cmd_inherits_no_ignored_signals(work: str) -> None:
    """Python ignores SIGPIPE and SIGXFSZ; CMD must start with the defaults (grep, not a
    Python probe: Python would ignore them again itself)."""
    ensure_pg_user()
    done = run_exec(work, ["--no-watch"], ["grep", "^SigIgn", "/proc/self/status"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["SigIgn:", "0000000000000000"]


def test_options_before_command_without_double_dash(work: str) -> None:
    ensure_pg_user()
    done = subprocess.run(
        [*PGOOM_EXEC, "--no-watch", *probe_cmd(work, "--no-watch")],
        check=False,
        env=base_env(work),
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    assert probe_result(work)["argv"] == ["--no-watch"]


@pytest.mark.parametrize(
    ("command", "code", "message"),
    [
        (["sh", "-c", "exit 42"], 42, None),
        (["/no/such/program"], 127, "pgoom: /no/such/program: command not found"),
        (["no-such-program-pgoom"], 127, "pgoom: no-such-program-pgoom: command not found"),
        (["{work}/plain"], 126, "pgoom: {work}/plain: cannot execute: Permission denied"),
        (["{work}/garbage"], 126, "pgoom: {work}/garbage: cannot execute: Exec format error"),
        (["/tmp"], 126, "pgoom: /tmp: cannot execute: Permission denied"),
        (["sh", "-c", "kill -TERM $$"], -signal.SIGTERM, None),
    ],
)
def test_exit_status_passes_through(
    work: str, command: list[str], code: int, message: Optional[str]
) -> None:
    ensure_pg_user()
    for name, mode in (("plain", 0o644), ("garbage", 0o755)):
        with open(os.path.join(work, name), "wb") as f:
            f.write(b"\x00\x01 not a program\n")
        os.chmod(os.path.join(work, name), mode)
    done = run_exec(work, ["--no-watch"], [arg.format(work=work) for arg in command])
    assert done.returncode == code, done.stderr
    if message is not None:
        assert message.format(work=work) in done.stderr


def test_killed_cmd_reads_as_128_plus_signal_in_a_shell(work: str) -> None:
    ensure_pg_user()
    line = f"{' '.join(PGOOM_EXEC)} --no-watch -- sh -c 'kill -KILL $$'; echo $?"
    done = subprocess.run(
        ["sh", "-c", line],
        check=False,
        env=base_env(work),
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert done.stdout.strip() == str(128 + signal.SIGKILL)


def test_signals_reach_cmd(work: str) -> None:
    ensure_pg_user()
    ready, got = os.path.join(work, "ready"), os.path.join(work, "got")
    script = f"trap 'echo TERM > {got}; exit 3' TERM; touch {ready}; while :; do sleep 0.05; done"
    proc = subprocess.Popen(
        [*PGOOM_EXEC, "--no-watch", "--", "sh", "-c", script], env=base_env(work), cwd="/"
    )
    try:
        wait_for(lambda: os.path.exists(ready), 15, what="CMD to start")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=15) == 3
        with open(got) as f:
            assert f.read().strip() == "TERM"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_score_lowered_for_cmd_and_never_raised(work: str) -> None:
    ensure_pg_user()
    done = run_exec(work, ["--no-watch", "--score", "0"], probe_cmd(work), score=1000)
    assert done.returncode == 0, done.stderr
    assert probe_result(work)["score"] == 0
    done = run_exec(work, ["--no-watch", "--score", "500"], probe_cmd(work), score=0)
    assert probe_result(work)["score"] == 0


@pytest.mark.vm
@pytest.mark.parametrize("score", [-900, -1000])
def test_score_below_zero_for_cmd_with_cap_sys_resource(work: str, score: int) -> None:
    """The production case the refused one below stands in for on this machine."""
    ensure_pg_user()
    done = run_exec(work, ["--no-watch", "--score", str(score)], probe_cmd(work), score=0)
    assert done.returncode == 0, done.stderr
    assert "cannot set oom_score_adj" not in done.stderr
    assert probe_result(work)["score"] == score


def test_refused_score_warns_with_the_fix_and_still_runs_cmd(work: str) -> None:
    if has_cap(bounding_set(os.getpid()), CAP_SYS_RESOURCE):
        pytest.skip("this machine has CAP_SYS_RESOURCE: -900 is not refused")
    ensure_pg_user()
    done = run_exec(work, ["--no-watch", "--score", "-900"], probe_cmd(work), score=1000)
    assert done.returncode == 0, done.stderr
    assert "cannot set oom_score_adj to -900" in done.stderr
    assert "--cap-add SYS_RESOURCE" in done.stderr
    assert probe_result(work)["score"] == 1000


def test_not_root_skips_root_steps_once_and_runs_cmd(work: str) -> None:
    ensure_pg_user()
    # uid 26 cannot reach the venv's interpreter under /root: the exec path needs only the
    # standard library, so the system python3 runs it from the source tree (as in the image).
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("no /usr/bin/python3")
    system_pgoom = ["/usr/bin/python3", "-m", "watcher", "exec"]
    done = run_exec(work, ["--score", "0"], probe_cmd(work), uid=26, score=1000, pgoom=system_pgoom)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("not running as root") == 1
    got = probe_result(work)
    assert got["uid"] == [26, 26, 26]
    assert got["score"] == 1000
    env = got["env"]
    assert isinstance(env, dict)
    assert env["PG_OOM_ADJUST_VALUE"] == "0"
    assert not os.path.exists(os.path.join(work, "monitor.lock"))  # no monitor tried


# ------------------------------------------------------------------------------ the monitor


def status_of(pid: int) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def bounding_set(pid: int) -> int:
    return int(status_of(pid)["CapBnd"], 16)


def has_cap(mask: int, cap: int) -> bool:
    return bool(mask & (1 << cap))


def tagged(tag: str) -> list[int]:
    """Live processes whose environment carries PGOOM_TEST_TAG=tag."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if f"PGOOM_TEST_TAG={tag}".encode() not in f.read().split(b"\0"):
                    continue
            found.append(int(name))
        except OSError:
            continue
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def state(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def monitor_of(tag: str) -> Optional[int]:
    for pid in tagged(tag):
        if "watcher.main" in cmdline(pid) and state(pid) not in (None, "Z"):
            return pid
    return None


def expected_monitor_caps() -> int:
    host = bounding_set(os.getpid())
    return host & ((1 << CAP_DAC_OVERRIDE) | (1 << CAP_SYS_RESOURCE))


def stop_tagged(tag: str) -> None:
    for pid in tagged(tag):
        try:
            os.kill(pid, signal.SIGKILL)  # our own test processes, by PID
        except ProcessLookupError:
            pass


def stopped(tag: str) -> bool:
    """Kill what is left of the tagged processes; True once none is left."""
    if not tagged(tag):
        return True
    stop_tagged(tag)
    return False


def another_monitor(tag: str, old: int) -> Callable[[], Optional[int]]:
    """A condition: the monitor of `tag` is back, with a PID other than `old`."""

    def found() -> Optional[int]:
        new = monitor_of(tag)
        return new if new is not None and new != old else None

    return found


def test_monitor_least_privilege_restarts_and_ends_with_cmd(work: str) -> None:
    ensure_pg_user()
    tag = uuid.uuid4().hex
    err_path = os.path.join(work, "stderr")
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [*PGOOM_EXEC, "--score", "0", "--", "sleep", "120"],
            env=base_env(work, PGOOM_TEST_TAG=tag),
            stderr=err,
            cwd="/",
        )
    try:
        monitor = wait_for(lambda: monitor_of(tag), 20, what="the monitor")
        assert isinstance(monitor, int)
        fields = status_of(monitor)
        want = expected_monitor_caps()
        assert int(fields["CapEff"], 16) == want
        assert int(fields["CapPrm"], 16) == want
        assert int(fields["CapBnd"], 16) == want
        assert int(fields["CapInh"], 16) == 0
        assert int(fields["CapAmb"], 16) == 0
        assert fields["NoNewPrivs"] == "1"
        assert fields["Uid"].split()[0] == "0"
        supervisor = int(fields["PPid"])
        assert status_of(supervisor)["Name"] == "pgoom-supervise"
        assert int(status_of(supervisor)["CapEff"], 16) == want
        assert supervisor != proc.pid
        assert children_of(proc.pid) == []  # CMD (sleep) has no child of ours
        # The watch itself started and runs with these capabilities.
        wait_for(lambda: "watching with source" in open(err_path).read(), 20, what="watch")

        # A second pgoom exec in the same "container" does not start a second monitor.
        second = run_exec(work, ["--score", "0"], ["true"], env=base_env(work))
        assert "a monitor already runs" in second.stderr

        os.kill(monitor, signal.SIGKILL)
        again = wait_for(
            lambda: (m := monitor_of(tag)) is not None and m != monitor and m,
            20,
            what="the monitor to come back",
        )
        assert isinstance(again, int)
        assert state(monitor) is None  # reaped by the supervisor, not left a zombie
        assert "was killed by signal 9" in open(err_path).read()

        os.kill(proc.pid, signal.SIGTERM)  # the container's main process ends
        proc.wait(timeout=10)
        wait_for(
            lambda: not [p for p in tagged(tag) if state(p) not in (None, "Z")],
            15,
            what="supervisor and monitor to end with CMD",
        )
        assert [p for p in tagged(tag) if state(p) == "Z"] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop_tagged(tag)


def test_no_zombies_when_cmd_is_pid_1_and_never_reaps(work: str) -> None:
    """In a container pgoom exec is PID 1 and so is CMD after the exec: sleep never calls
    wait(). The monitor's supervisor is CMD's child there and must reap the monitor."""
    ensure_pg_user()
    tag = uuid.uuid4().hex
    err_path = os.path.join(work, "stderr")
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [
                "unshare",
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child",
                *PGOOM_EXEC,
                "--score",
                "0",
                "--",
                "sleep",
                "120",
            ],
            env=base_env(work, PGOOM_TEST_TAG=tag),
            stderr=err,
            cwd="/",
        )
    try:
        monitor = wait_for(lambda: monitor_of(tag), 20, what="the monitor")
        assert isinstance(monitor, int)
        init = wait_for(lambda: children_of(proc.pid), 10, what="the namespace's PID 1")
        assert isinstance(init, list)
        cmd_pid = init[0]
        assert status_of(cmd_pid)["NSpid"].split()[-1] == "1"
        assert cmdline(cmd_pid).startswith("sleep 120")
        supervisor = int(status_of(monitor)["PPid"])
        assert children_of(cmd_pid) == [supervisor]  # reparented to PID 1 = CMD
        for _ in range(2):
            os.kill(monitor, signal.SIGKILL)
            new = wait_for(another_monitor(tag, monitor), 20, what="the monitor to come back")
            assert isinstance(new, int)
            assert state(monitor) is None
            monitor = new
        assert [state(p) for p in children_of(cmd_pid)] == ["S"]  # the supervisor, no zombie
    finally:
        proc.kill()  # unshare --kill-child takes the namespace down with it
        proc.wait()
        wait_for(lambda: stopped(tag), 10, what="namespace to end")


def test_no_watch_starts_nothing(work: str) -> None:
    ensure_pg_user()
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(
        [*PGOOM_EXEC, "--no-watch", "--", "sleep", "30"],
        env=base_env(work, PGOOM_TEST_TAG=tag),
        cwd="/",
    )
    try:
        wait_for(lambda: cmdline(proc.pid).startswith("sleep"), 10, what="exec")
        assert tagged(tag) == [proc.pid]
    finally:
        proc.kill()
        proc.wait()
