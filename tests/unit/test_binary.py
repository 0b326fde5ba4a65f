"""watcher.binary: a PostgreSQL server is recognised by content, not by its file name."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
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


# --- trust by ownership (issue 9, item 2) --------------------------------------------------


@pytest.mark.skipif(not SERVERS, reason="no PostgreSQL server installed")
def test_the_packaged_server_is_trusted_by_its_root_owned_path() -> None:
    verdict = binary.judge(SERVERS[-1], "", SERVERS[-1])
    assert verdict.trusted is True and verdict.server is True


def test_a_server_in_a_directory_others_can_write_is_not_trusted(tmp_path: Path) -> None:
    # tmp_path is below /tmp (sticky, world-writable): anyone could have put it there.
    fake = tmp_path / "postgres"
    fake.write_bytes(b"\x7fELF" + b"\0PostmasterMain\0")
    verdict = binary.judge(str(fake), "", str(fake))
    assert verdict.trusted is False and verdict.server is True
    assert "writable by group or others" in verdict.reason or "not root" in verdict.reason


def test_a_listed_binary_is_trusted_wherever_it_lives(tmp_path: Path) -> None:
    fake = tmp_path / "postgres"
    fake.write_bytes(b"\x7fELF" + b"\0PostmasterMain\0")
    assert binary.judge(str(fake), "", str(fake), trusted_paths={str(fake)}).trusted is True


@pytest.mark.skipif(os.geteuid() != 0, reason="files of another uid need root")
def test_a_root_path_holding_a_file_of_another_user_is_not_trusted(tmp_path: Path) -> None:
    root_dir = Path(tempfile.mkdtemp(prefix="pgoom-trust-", dir="/var/tmp"))
    try:
        os.chmod(root_dir, 0o755)
        fake = root_dir / "postgres"
        fake.write_bytes(b"\x7fELF" + b"\0PostmasterMain\0")
        os.chown(fake, 26, 26)
        verdict = binary.judge(str(fake), "", str(fake))
        assert verdict.trusted is False and "belongs to uid 26" in verdict.reason
        os.chown(fake, 0, 0)
        os.chmod(fake, 0o775)
        assert "writable by group" in binary.judge(str(fake), "", str(fake)).reason
    finally:
        shutil.rmtree(root_dir)
