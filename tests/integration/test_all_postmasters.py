"""`pgoom watch --all` on a bare host: every real postmaster is protected whatever its data
directory and however it was started, and a look-alike named postgres is not.

Layouts, outside /pgdata/pg so the default pattern cannot be what matches:
- Debian: /usr/lib/postgresql/<v>/bin/postgres -D /var/lib/postgresql/<v>/main
  -c config_file=/etc/postgresql/<v>/main/postgresql.conf, through pg_ctl as pg_ctlcluster does;
- pg_ctl with PGDATA in the environment and no -D (the postmaster finds its directory in
  its environment);
- RHEL/PGDG: /usr/pgsql-<v>/bin/postmaster -D /var/lib/pgsql/<v>/data, postmaster being a
  symlink to postgres, started directly as the PGDG unit does;
- a relative -D from the parent directory.
Each lives under a temporary root that mirrors those paths, never in the real /usr or /var.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Optional

import pytest

from tests.support.pg import (
    Template,
    alive,
    children_settled_at,
    demote,
    pidfile_pid,
    read_score,
    wait_for,
)
from tests.support.watcher import Watcher

pytestmark = pytest.mark.root

PROTECTED = 0  # nobody here can go below 0: postmaster 0, everything else 1000
LAUNCHER = 1000


class Bare:
    """A cluster copied from the template into a mirrored bare-host layout."""

    def __init__(self, template: Template, root: str, data_dir: str) -> None:
        self.template = template
        self.root = root
        self.data_dir = root + data_dir
        self.socket_dir = tempfile.mkdtemp(prefix="pgoom-sock-")
        os.chown(self.socket_dir, template.uid, template.gid)
        os.makedirs(os.path.dirname(self.data_dir), exist_ok=True)
        subprocess.run(["cp", "-a", template.path, self.data_dir], check=True)
        os.chmod(self.data_dir, 0o700)
        self.log_path = f"{self.socket_dir}/postgres.log"
        with open(self.log_path, "ab"):
            pass
        os.chown(self.log_path, template.uid, template.gid)  # pg_ctl -l appends as uid 26
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": "/usr/bin:/bin",
            "LANG": "C",
            "PG_OOM_ADJUST_FILE": "/proc/self/oom_score_adj",
            "PG_OOM_ADJUST_VALUE": str(LAUNCHER),
            **extra,
        }

    def run(self, argv: list[str], cwd: Optional[str] = None, **env: str) -> None:
        """Start as uid 26 from a parent at oom_score_adj 1000; pg_ctl returns, a direct
        postgres keeps running (reaped in stop())."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                env=self.env(**env),
                cwd=cwd,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                preexec_fn=demote(self.template.uid, self.template.gid, LAUNCHER),
                start_new_session=True,
            )

    def postmaster_pid(self) -> int:
        pid = wait_for(
            lambda: pidfile_pid(self.data_dir), 30, 0.02, what=f"postmaster.pid in {self.data_dir}"
        )
        assert isinstance(pid, int)
        return pid

    def wait_ready(self) -> None:
        ready = [f"{self.template.bindir}/pg_isready", "-q", "-h", self.socket_dir]
        wait_for(
            lambda: subprocess.run([*ready, "-U", "postgres"], check=False).returncode == 0,
            30,
            0.05,
            what=f"{self.data_dir} to accept connections",
        )

    def connect_backend(self) -> subprocess.Popen[bytes]:
        """A client session that stays open, so the postmaster has a backend child."""
        psql = f"{self.template.bindir}/psql"
        return subprocess.Popen(
            [psql, "-h", self.socket_dir, "-U", "postgres", "-XAtq", "-c", "select pg_sleep(30)"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        try:
            with open(f"{self.data_dir}/postmaster.pid") as f:
                pid = int(f.readline())
        except (FileNotFoundError, ValueError):
            pid = 0
        if pid and os.path.exists(f"/proc/{pid}"):
            os.kill(pid, 3)  # SIGQUIT: immediate shutdown of our own postmaster
            wait_for(lambda: not alive(pid), 30, 0.05, what="postmaster to stop")
        if self.proc is not None:
            self.proc.wait(timeout=10)
        with open(self.log_path, errors="replace") as log:
            print(f"--- {self.data_dir} server log ---\n{log.read()[-3000:]}")  # on failure
        shutil.rmtree(self.socket_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def bare_root() -> Iterator[str]:
    root = tempfile.mkdtemp(prefix="pgoom-bare-", dir="/var/tmp")
    os.chmod(root, 0o755)  # the postgres user must traverse it
    yield root
    shutil.rmtree(root, ignore_errors=True)


SOURCES = {
    "netlink": ["--source", "netlink"],
    # Poll examines new PIDs only; pg_ctl's shell becomes the postmaster by exec under the
    # same PID, which the periodic full scan (--verify-interval in poll mode) catches.
    "poll": ["--source", "poll", "--interval", "0.1", "--verify-interval", "0.5"],
}


@pytest.fixture(scope="module", params=sorted(SOURCES))
def watcher(request: pytest.FixtureRequest) -> Iterator[Watcher]:
    # No --pattern: the default pattern matches none of these layouts; --all must.
    w = Watcher(
        "--all",
        "--score",
        str(PROTECTED),
        "--log-level",
        "DEBUG",
        "--config",
        "",
        *SOURCES[request.param],
    )
    try:
        w.wait_ready()
        assert f"source: {request.param}" in w.text()
        yield w
    finally:
        w.stop()


def _debian(template: Template, root: str) -> tuple[Bare, list[str], Optional[str], dict[str, str]]:
    version = os.path.basename(os.path.dirname(template.bindir))
    bare = Bare(template, root, f"/var/lib/postgresql/{version}/main")
    conf_dir = f"{root}/etc/postgresql/{version}/main"
    os.makedirs(conf_dir, mode=0o755)
    # Debian keeps postgresql.conf in /etc, away from the data directory.
    shutil.move(f"{bare.data_dir}/postgresql.conf", f"{conf_dir}/postgresql.conf")
    os.chmod(f"{conf_dir}/postgresql.conf", 0o644)
    argv = [
        f"{template.bindir}/pg_ctl",
        "start",
        "-D",
        bare.data_dir,
        "-l",
        bare.log_path,
        "-s",
        "-o",
        f"-c config_file={conf_dir}/postgresql.conf -k {bare.socket_dir}",
    ]
    return bare, argv, None, {}


def _pg_ctl_pgdata(
    template: Template, root: str
) -> tuple[Bare, list[str], Optional[str], dict[str, str]]:
    bare = Bare(template, root, "/srv/postgres/cluster-a")
    argv = [
        f"{template.bindir}/pg_ctl",
        "start",
        "-l",
        bare.log_path,
        "-s",
        "-o",
        f"-k {bare.socket_dir}",
    ]
    return bare, argv, None, {"PGDATA": bare.data_dir}


def _rhel(template: Template, root: str) -> tuple[Bare, list[str], Optional[str], dict[str, str]]:
    version = os.path.basename(os.path.dirname(template.bindir))
    bindir = f"{root}/usr/pgsql-{version}/bin"
    os.makedirs(bindir, mode=0o755)
    # PGDG's postmaster is a symlink to postgres; PostgreSQL resolves it to find its
    # libraries and share directory, and /proc/<pid>/exe names postgres.
    os.symlink(f"{template.bindir}/postgres", f"{bindir}/postmaster")
    bare = Bare(template, root, f"/var/lib/pgsql/{version}/data")
    argv = [f"{bindir}/postmaster", "-D", bare.data_dir, "-k", bare.socket_dir]
    return bare, argv, None, {}


def _relative(
    template: Template, root: str
) -> tuple[Bare, list[str], Optional[str], dict[str, str]]:
    bare = Bare(template, root, "/opt/db/15/data")
    argv = [f"{template.bindir}/postgres", "-D", "data", "-k", bare.socket_dir]
    return bare, argv, os.path.dirname(bare.data_dir), {}


def _config_dir(
    template: Template, root: str
) -> tuple[Bare, list[str], Optional[str], dict[str, str]]:
    """-D names a configuration directory whose postgresql.conf sets data_directory (a
    layout some hosts use): after start-up the postmaster's working directory is the real
    data directory."""
    bare = Bare(template, root, "/var/lib/pg/data")
    conf_dir = f"{root}/etc/pg"
    os.makedirs(conf_dir)
    shutil.move(f"{bare.data_dir}/postgresql.conf", f"{conf_dir}/postgresql.conf")
    for name in ("pg_hba.conf", "pg_ident.conf"):
        shutil.copy(f"{bare.data_dir}/{name}", f"{conf_dir}/{name}")
    with open(f"{conf_dir}/postgresql.conf", "a") as conf:
        conf.write(f"\ndata_directory = '{bare.data_dir}'\n")
    subprocess.run(["chown", "-R", f"{template.uid}:{template.gid}", conf_dir], check=True)
    argv = [f"{template.bindir}/postgres", "-D", conf_dir, "-k", bare.socket_dir]
    return bare, argv, None, {}


@pytest.mark.parametrize(
    "layout",
    [_debian, _pg_ctl_pgdata, _rhel, _relative, _config_dir],
)
def test_every_postmaster_is_protected(
    layout: object, pg_template: Template, bare_root: str, watcher: Watcher
) -> None:
    root = tempfile.mkdtemp(dir=bare_root)
    os.chmod(root, 0o755)
    bare, argv, cwd, env = layout(pg_template, root)  # type: ignore[operator]
    client = None
    try:
        bare.run(argv, cwd=cwd, **env)
        pid = bare.postmaster_pid()
        wait_for(lambda: read_score(pid) == PROTECTED, 10, what=f"postmaster {pid} protected")
        # Identified with the right data directory. ("protected postmaster pid=..." or, if
        # another watcher on this host was quicker, "postmaster pid=... already at ...".)
        text = watcher.wait_for_log(f"postmaster pid={pid} data_dir=")
        assert f"postmaster pid={pid} data_dir={bare.data_dir} " in text
        bare.wait_ready()
        client = bare.connect_backend()
        # The children reset themselves through PG_OOM_ADJUST_*; pgoom left them alone.
        children_settled_at(pid, LAUNCHER, minimum=4)
        assert read_score(pid) == PROTECTED
    finally:
        if client is not None:
            client.kill()
            client.wait()
        bare.stop()


def test_a_look_alike_named_postgres_is_not_protected(
    pg_template: Template, bare_root: str, watcher: Watcher
) -> None:
    """`sleep` behind a symlink called postgres, run by the owner of a real data directory
    with PGDATA pointing at it: every check but the executable passes."""
    root = tempfile.mkdtemp(dir=bare_root)
    os.chmod(root, 0o755)
    bindir = f"{root}/usr/local/bin"
    os.makedirs(bindir, mode=0o755)
    os.symlink(shutil.which("sleep") or "/bin/sleep", f"{bindir}/postgres")
    fake = Bare(pg_template, root, "/var/lib/postgresql/fake/main")
    # sleep would refuse -D: the data directory comes through PGDATA, as pg_ctl passes it.
    fake.run([f"{bindir}/postgres", "30"], PGDATA=fake.data_dir)
    assert fake.proc is not None
    real = Bare(pg_template, root, "/var/lib/postgresql/real/main")
    try:
        # A real postmaster beside it, in the same layout, is protected: the watcher works.
        real.run([f"{pg_template.bindir}/postgres", "-D", real.data_dir, "-k", real.socket_dir])
        pid = real.postmaster_pid()
        wait_for(lambda: read_score(pid) == PROTECTED, 10, what="real postmaster protected")
        # The look-alike was examined and refused for what it is.
        text = watcher.wait_for_log(f"not protecting pid {fake.proc.pid} ", timeout_s=10)
        assert "executable is sleep, not postgres" in text
        assert f"protected postmaster pid={fake.proc.pid} " not in text
        assert read_score(fake.proc.pid) == LAUNCHER
        assert fake.proc.poll() is None, "the look-alike must still be running"
    finally:
        fake.proc.kill()
        fake.proc.wait()
        fake.proc = None
        real.stop()
        fake.stop()
