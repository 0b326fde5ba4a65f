"""How long `pgoom exec` holds up the database's start: from the start of the interpreter to
the exec of CMD. CMD is /bin/true, so one run's wall time is pgoom's path plus true; true
run directly is measured in the same run and subtracted.

    .venv/bin/python scripts/bench_exec.py [--runs 40]        (as root for the root rows)

Rows:
  python -I -c pass           the interpreter alone: the floor for any Python entrypoint
  exec, not root              non-root path (the operator's uid 26): env + exec
  exec as root, --no-watch    + own oom_score_adj, user switch to 26
  exec as root, monitor       + lock, fork of the supervisor (the monitor itself starts
                              in the background, after CMD's exec; each run waits for it
                              to finish so runs do not overlap)
  console script (venv)       the development install's `pgoom` script, for comparison
The image runs pgoom like the "-I" rows (python3 -I, pgoom's directory first on sys.path).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRUE = "/bin/true"
PYTHON39 = "/root/.pyenv/versions/3.9.18/bin/python3.9"


def launcher(python: str, *args: str) -> list[str]:
    """What the image's /opt/pgoom/bin/pgoom does: python -I, pgoom first on sys.path."""
    boot = (
        f"import sys; sys.path.insert(0, {REPO!r}); sys.argv[0] = 'pgoom'; "
        "from watcher.main import main; main()"
    )
    return [python, "-I", "-c", boot, *args]


def as_uid(uid: int) -> Callable[[], None]:
    def demote() -> None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)

    return demote


def time_runs(
    argv: list[str],
    runs: int,
    env: dict[str, str],
    preexec: Optional[Callable[[], None]] = None,
    lock: Optional[str] = None,
) -> list[float]:
    samples = []
    for _ in range(runs + 3):  # three warm-up runs: page cache, .pyc files
        start = time.perf_counter()
        done = subprocess.run(
            argv, env=env, preexec_fn=preexec, check=False, stderr=subprocess.DEVNULL
        )
        samples.append((time.perf_counter() - start) * 1000)
        if done.returncode != 0:
            raise SystemExit(f"{argv[:4]}... exited {done.returncode}")
        if lock:
            wait_for_monitor_gone(lock)
    return samples[3:]


def wait_for_monitor_gone(lock: str) -> None:
    """The supervisor holds the lock until it and the monitor are gone."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    finally:
        os.close(fd)


def row(name: str, samples: list[float], floor_ms: float) -> None:
    p50 = statistics.median(samples)
    p90 = sorted(samples)[int(len(samples) * 0.9) - 1]
    print(f"{name:<34} {p50:8.1f} {p90:8.1f} {p50 - floor_ms:12.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="pgoom-bench-exec-")
    lock = os.path.join(work, "monitor.lock")
    env = {
        "PATH": "/usr/bin:/bin",
        "PGOOM_MONITOR_LOCK": lock,
        "PGOOM_LOG_FILE": "",
        "PGOOM_DRY_RUN": "1",  # the monitor must not touch anyone's postmaster
        "PGOOM_SOURCE": "poll",
    }
    is_root = os.geteuid() == 0
    me = str(os.getuid())
    true_ms = statistics.median(time_runs([TRUE], args.runs, env))
    print(f"pgoom exec start-to-exec, {args.runs} runs each, ms (minus /bin/true: {true_ms:.1f})")
    print(f"{'':<34} {'p50':>8} {'p90':>8} {'p50 - true':>12}")
    pythons = [("", sys.executable)]
    if os.path.exists(PYTHON39):
        pythons.append((" [3.9]", PYTHON39))
    for tag, python in pythons:
        row(
            f"python -I -c pass{tag}",
            time_runs([python, "-I", "-c", "pass"], args.runs, env),
            true_ms,
        )
        if not is_root:
            exec_no_watch = launcher(python, "exec", "--no-watch", "--user", me, "--", TRUE)
            row(f"exec, not root{tag}", time_runs(exec_no_watch, args.runs, env), true_ms)
        if is_root:
            switch = launcher(
                python, "exec", "--no-watch", "--user", "26", "--score", "0", "--", TRUE
            )
            row(f"exec as root, --no-watch{tag}", time_runs(switch, args.runs, env), true_ms)
            monitor = launcher(python, "exec", "--user", "26", "--score", "0", "--", TRUE)
            row(
                f"exec as root, monitor{tag}",
                time_runs(monitor, args.runs, env, lock=lock),
                true_ms,
            )
    if is_root and os.path.exists("/usr/bin/python3"):
        # As nobody: the interpreters above live under /root, which nobody cannot enter.
        system = "/usr/bin/python3"
        pass_ms = time_runs([system, "-I", "-c", "pass"], args.runs, env, as_uid(65534))
        row("python -I -c pass [system]", pass_ms, true_ms)
        argv = launcher(system, "exec", "--no-watch", "--", TRUE)
        row("exec, not root [system]", time_runs(argv, args.runs, env, as_uid(65534)), true_ms)
    script = os.path.join(os.path.dirname(sys.executable), "pgoom")
    if os.path.exists(script):
        argv = [script, "exec", "--no-watch", "--user", me, "--score", "0", "--", TRUE]
        row("console script (venv), --no-watch", time_runs(argv, args.runs, env), true_ms)


if __name__ == "__main__":
    main()
