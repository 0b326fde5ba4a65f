"""watcher.binary: a PostgreSQL server is recognised by content, not by its file name."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

import pytest

from watcher import binary
from watcher.binary import is_postgres_server

SERVERS = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))


@pytest.mark.skipif(not SERVERS, reason="no PostgreSQL server installed")
def test_the_real_server_binary_is_recognised() -> None:
    assert is_postgres_server(SERVERS[-1]) is True


@pytest.mark.skipif(not SERVERS, reason="no PostgreSQL server installed")
def test_pg_ctl_is_not_a_server() -> None:
    assert is_postgres_server(os.path.join(os.path.dirname(SERVERS[-1]), "pg_ctl")) is False


def test_a_renamed_sleep_is_not_a_server(tmp_path: Path) -> None:
    fake = tmp_path / "postgres"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", fake)
    assert is_postgres_server(str(fake)) is False


def test_unopenable_and_empty_files(tmp_path: Path) -> None:
    assert is_postgres_server(str(tmp_path / "missing")) is None
    empty = tmp_path / "postgres"
    empty.write_bytes(b"")
    assert is_postgres_server(str(empty)) is False


def test_verdicts_are_cached_per_inode_and_change_with_the_file(tmp_path: Path) -> None:
    fake = tmp_path / "postgres"
    fake.write_bytes(b"\x7fELF" + b"\0" * 64)
    assert is_postgres_server(str(fake)) is False
    info = fake.stat()
    key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    assert binary._cache[key] is False
    # Rewritten in place with the exported symbol: a new size and mtime, a new verdict.
    fake.write_bytes(b"\x7fELF" + b"\0" * 64 + b"\0PostmasterMain\0")
    os.utime(fake, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))
    assert is_postgres_server(str(fake)) is True
