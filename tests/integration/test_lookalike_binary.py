"""A program copied to a file named postgres in a root-owned directory, run by the data
directory's owner with `-D <data dir>`, passes every check but the binary's content: it must
stay unprotected."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from tests.support.pg import PGDATA_ROOT, ensure_pg_user, read_score, wait_for
from tests.support.watcher import Watcher

pytestmark = pytest.mark.root


@pytest.fixture
def lookalike() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    uid, gid = ensure_pg_user()
    # A directory only root can write: the path is trusted, so the content decides.
    bindir = tempfile.mkdtemp(prefix="pgoom-lookalike-", dir="/var/lib")
    os.chmod(bindir, 0o755)
    fake = os.path.join(bindir, "postgres")
    shutil.copy("/usr/bin/perl", fake)  # runs from anywhere, ignores the arguments after -e
    data_dir = os.path.join(PGDATA_ROOT, f"pglookalike{os.getpid()}")
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    os.chown(data_dir, uid, gid)

    def demote() -> None:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    proc = subprocess.Popen(
        [fake, "-e", "sleep 60", "-D", data_dir], preexec_fn=demote, stdin=subprocess.DEVNULL
    )
    yield proc, data_dir
    proc.kill()
    proc.wait()
    shutil.rmtree(bindir, ignore_errors=True)
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.parametrize("source", ["netlink", "poll"])
def test_renamed_program_with_the_owners_data_dir_is_not_protected(
    source: str, lookalike: tuple[subprocess.Popen[bytes], str]
) -> None:
    proc, data_dir = lookalike
    watcher = Watcher(
        "--source", source, "--interval", "0.2", "--score", "0", f"--pattern=-D {data_dir}"
    )
    try:
        # The start-up scan sees the look-alike that is already running.
        watcher.wait_ready()
        text = watcher.wait_for_log(f"not protecting pid {proc.pid}")
        assert "is not a PostgreSQL server binary" in text
        assert read_score(proc.pid) == 1000
        wait_for(lambda: proc.poll() is None, 1, what="look-alike still running")
    finally:
        assert watcher.stop() == 0
