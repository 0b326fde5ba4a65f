"""How long `pgoom exec` holds up the database's start: from the start of the interpreter to
the exec of CMD. CMD is /bin/true, so one run's wall time is pgoom's path plus true; true
run directly is measured in the same run and subtracted.

    .venv/bin/python scripts/benchmarks/exec.py [--runs 40]        (as root for the root rows)

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

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


class Case:
    def __init__(
        self,
        name: str,
        argv: list[str],
        preexec: Optional[Callable[[], None]] = None,
        lock: Optional[str] = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.preexec = preexec
        self.lock = lock
        self.samples_ms: list[float] = []

    def run_once(self, env: dict[str, str]) -> None:
        start = time.perf_counter()
        done = subprocess.run(
            self.argv, env=env, preexec_fn=self.preexec, check=False, stderr=subprocess.DEVNULL
        )
        self.samples_ms.append((time.perf_counter() - start) * 1000)
        if done.returncode != 0:
            raise SystemExit(f"{self.name}: exited {done.returncode}")
        if self.lock:
            wait_for_monitor_gone(self.lock)


def wait_for_monitor_gone(lock: str) -> None:
    """The supervisor holds the lock until it and the monitor are gone."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    finally:
        os.close(fd)


def cases(work: str) -> list[Case]:
    lock = os.path.join(work, "monitor.lock")
    is_root = os.geteuid() == 0
    me = str(os.getuid())
    found = [Case("/bin/true", [TRUE])]
    pythons = [("", sys.executable)]
    if os.path.exists(PYTHON39):
        pythons.append((" [3.9]", PYTHON39))
    for tag, python in pythons:
        found.append(Case(f"python -I -c pass{tag}", [python, "-I", "-c", "pass"]))
        if not is_root:
            argv = launcher(python, "exec", "--no-watch", "--user", me, "--", TRUE)
            found.append(Case(f"exec, not root{tag}", argv))
            continue
        argv = launcher(python, "exec", "--no-watch", "--user", "26", "--score", "0", "--", TRUE)
        found.append(Case(f"exec as root, --no-watch{tag}", argv))
        argv = launcher(python, "exec", "--user", "26", "--score", "0", "--", TRUE)
        found.append(Case(f"exec as root, monitor{tag}", argv, lock=lock))
    if is_root and os.path.exists("/usr/bin/python3"):
        # As nobody: the interpreters above live under /root, which nobody cannot enter.
        system, nobody = "/usr/bin/python3", as_uid(65534)
        found.append(Case("python -I -c pass [system]", [system, "-I", "-c", "pass"], nobody))
        argv = launcher(system, "exec", "--no-watch", "--", TRUE)
        found.append(Case("exec, not root [system]", argv, nobody))
    script = os.path.join(os.path.dirname(sys.executable), "pgoom")
    if os.path.exists(script):
        argv = [script, "exec", "--no-watch", "--user", me, "--score", "0", "--", TRUE]
        found.append(Case("console script (venv), --no-watch", argv))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="pgoom-bench-exec-")
    env = {
        "PATH": "/usr/bin:/bin",
        "PGOOM_MONITOR_LOCK": os.path.join(work, "monitor.lock"),
        "PGOOM_LOG_FILE": "",
        "PGOOM_DRY_RUN": "1",  # the monitor must not touch anyone's postmaster
        "PGOOM_SOURCE": "poll",
    }
    todo = cases(work)
    for case in todo:  # warm-up: page cache, .pyc files
        case.run_once(env)
        case.samples_ms.clear()
    # Interleaved, so that the machine's load swings hit every case alike.
    for _ in range(args.runs):
        for case in todo:
            case.run_once(env)
    true_ms = statistics.median(todo[0].samples_ms)
    load = os.getloadavg()[0]
    print(f"pgoom exec, start to exec of CMD: {args.runs} interleaved runs, ms, load {load:.1f}")
    print(f"{'':<36} {'min':>7} {'p50':>7} {'p90':>7} {'p50-true':>9}")
    for case in todo:
        samples = sorted(case.samples_ms)
        p50 = statistics.median(samples)
        p90 = samples[max(0, int(len(samples) * 0.9) - 1)]
        print(f"{case.name:<36} {samples[0]:7.1f} {p50:7.1f} {p90:7.1f} {p50 - true_ms:9.1f}")


if __name__ == "__main__":
    main()
