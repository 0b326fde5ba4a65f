"""Capture real /proc samples for the unit tests' fake trees (run as root, once):

    .venv/bin/python -m tests.unit.samples.capture

Starts a real PostgreSQL cluster with cluster_name set and one without, a kernel thread is
already there, makes a zombie and processes with hostile names, and copies each one's
stat, cmdline, status and a filtered environ (PG* variables only: nothing private) into
tests/unit/samples/<name>/, with the exe and cwd link targets in meta.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable

from tests.support.pg import Cluster, Template, children_of, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
KEEP_ENV = ("PGDATA", "PG_OOM_ADJUST_FILE", "PG_OOM_ADJUST_VALUE", "LANG")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def renamed(pid: int, comm: str) -> Callable[[], bool]:
    """A condition: process `pid` now calls itself `comm`."""
    return lambda: _read(f"/proc/{pid}/comm") == f"{comm}\n".encode()


def _link(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def save(name: str, pid: int, note: str, data_dir: str | None = None) -> None:
    out = os.path.join(HERE, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for part in ("stat", "cmdline", "status"):
        with open(os.path.join(out, part), "wb") as f:
            f.write(_read(f"/proc/{pid}/{part}"))
    try:
        raw_environ = _read(f"/proc/{pid}/environ")
    except OSError:  # kernel threads: ESRCH
        raw_environ = b""
    environ = [e for e in raw_environ.split(b"\0") if e.split(b"=", 1)[0].decode() in KEEP_ENV]
    with open(os.path.join(out, "environ"), "wb") as f:
        f.write(b"".join(e + b"\0" for e in environ))
    meta = {
        "pid": pid,
        "note": note,
        "exe": _link(f"/proc/{pid}/exe"),
        "cwd": _link(f"/proc/{pid}/cwd"),
        "data_dir": data_dir,
        "oom_score_adj": int(_read(f"/proc/{pid}/oom_score_adj")),
    }
    if data_dir is not None:
        with open(os.path.join(out, "postmaster.pid"), "wb") as f:
            f.write(_read(f"{data_dir}/postmaster.pid"))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


def title(pid: int) -> str:
    return _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode().strip()


def capture_cluster(template: Template, cluster_name: str | None, prefix: str) -> None:
    cluster = Cluster(template)
    if cluster_name:
        with open(f"{cluster.data_dir}/postgresql.conf", "a") as conf:
            conf.write(f"\ncluster_name = '{cluster_name}'\n")
    try:
        pm = cluster.start()
        sleeper = subprocess.Popen(
            [
                f"{cluster.bindir}/psql",
                "-h",
                cluster.socket_dir,
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-XAtq",
                "-c",
                "select pg_sleep(30)",
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_for(lambda: any("SELECT" in title(c) for c in children_of(pm)), 10, what="a backend")
        save(f"{prefix}postmaster", pm, "postmaster", cluster.data_dir)
        wanted = {"checkpointer", "walwriter", "autovacuum launcher", "SELECT"}
        for child in children_of(pm):
            text = title(child)
            for key in list(wanted):
                if key in text:
                    wanted.discard(key)
                    name = "backend" if key == "SELECT" else key.replace(" ", "_")
                    save(f"{prefix}{name}", child, text)
        sleeper.kill()
        sleeper.wait()
    finally:
        cluster.destroy()


def capture_hostile() -> None:
    """Processes whose comm or argv hold what a naive parser trips on."""
    # A process may rename only itself (/proc/<pid>/comm of another is EINVAL).
    code = "import sys, time; open('/proc/self/comm', 'w').write(sys.argv[1]); time.sleep(300)"
    procs = []
    for name, comm, argv0 in (
        ("hostile_paren", "foo) Z 1 (bar", "python3"),
        ("hostile_newline", "a b\nc) R 9", "my prog\nwith ) newline"),
    ):
        proc = subprocess.Popen([argv0, "-c", code, comm], executable=sys.executable)
        wait_for(renamed(proc.pid, comm), 5)
        save(name, proc.pid, f"comm {comm!r}")
        procs.append(proc)
    for proc in procs:
        proc.kill()
        proc.wait()


def capture_zombie() -> None:
    proc = subprocess.Popen(["/bin/true"])
    wait_for(lambda: _read(f"/proc/{proc.pid}/stat").rsplit(b")", 1)[1].split()[0] == b"Z", 5)
    save("zombie", proc.pid, "zombie (exited, not reaped)")
    proc.wait()


def capture_script_postgres() -> None:
    """A shell script called postgres: its exe is the shell, not postgres."""
    tmp = tempfile.mkdtemp(prefix="pgoom-capture-")
    script = os.path.join(tmp, "postgres")
    with open(script, "w") as f:
        f.write("#!/bin/sh\nread x\n")
    os.chmod(script, 0o755)
    proc = subprocess.Popen(
        [script, "-D", "/pgdata/pg16"], stdin=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"}
    )
    wait_for(lambda: b"postgres" in _read(f"/proc/{proc.pid}/cmdline"), 5)
    save("script_postgres", proc.pid, "#!/bin/sh script named postgres")
    proc.kill()
    proc.wait()
    shutil.rmtree(tmp)


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("capture: run as root (clusters run as uid 26)")
    template = Template()
    try:
        capture_cluster(template, "main", "named_")
        capture_cluster(template, None, "")
    finally:
        template.cleanup()
    save("kthreadd", 2, "kernel thread")
    capture_zombie()
    capture_hostile()
    capture_script_postgres()


if __name__ == "__main__":
    main()
