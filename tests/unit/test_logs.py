"""SafeFileSink: the log file in /tmp as root must not be a trap; rotation stays bounded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from loguru import logger

from watcher.logs import SafeFileSink, UnsafeLogPath, setup_logging

IS_ROOT = os.geteuid() == 0


def test_refuses_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "etc-shadow"
    target.write_text("secret\n")
    link = tmp_path / "postgres-oom-adjuster.log"
    link.symlink_to(target)
    with pytest.raises(UnsafeLogPath, match="cannot open"):
        SafeFileSink(str(link))
    assert target.read_text() == "secret\n"  # never appended to


def test_refuses_a_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "log"
    link.symlink_to(tmp_path / "would-be-created")
    with pytest.raises(UnsafeLogPath):
        SafeFileSink(str(link))
    assert not (tmp_path / "would-be-created").exists()


@pytest.mark.skipif(not IS_ROOT, reason="chown to another uid needs root")
def test_refuses_a_file_owned_by_another_uid(tmp_path: Path) -> None:
    planted = tmp_path / "log"
    planted.write_text("")
    os.chown(planted, 65534, 65534)
    with pytest.raises(UnsafeLogPath, match=r"not a regular file owned by uid 0"):
        SafeFileSink(str(planted))
    assert planted.read_text() == ""


def test_refuses_a_fifo_without_blocking(tmp_path: Path, alarm: None) -> None:
    # Opening a FIFO for writing blocks until a reader comes: a trap planted in /tmp must
    # not stop pgoom from starting.
    fifo = tmp_path / "log"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeLogPath):
        SafeFileSink(str(fifo))
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(UnsafeLogPath, match="not a regular file"):
            SafeFileSink(str(fifo))
    finally:
        os.close(reader)


def test_appends_to_its_own_file(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_text("old\n")
    sink = SafeFileSink(str(path))
    sink.write("new\n")
    sink.close()
    assert path.read_text() == "old\nnew\n"


def test_new_file_is_not_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "log"
    SafeFileSink(str(path)).close()
    assert os.stat(path).st_mode & 0o007 == 0


def test_rotates_keeping_n_backups_and_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "log"
    max_bytes, backups = 200, 2
    sink = SafeFileSink(str(path), max_bytes=max_bytes, backups=backups)
    lines = [f"line {i:04d} " + "x" * 20 + "\n" for i in range(200)]
    for line in lines:
        sink.write(line)
        files = sorted(tmp_path.iterdir())
        total = sum(f.stat().st_size for f in files)
        assert total <= (backups + 1) * max_bytes
        assert all(f.stat().st_size <= max_bytes for f in files)
    sink.close()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["log", "log.1", "log.2"]
    # The newest lines are in log, the ones before in log.1, then log.2; nothing reordered.
    text = (
        path.with_name("log.2").read_text() + path.with_name("log.1").read_text() + path.read_text()
    )
    assert text == "".join(lines)[-len(text) :]
    assert text.endswith(lines[-1])


def test_rotation_replaces_a_planted_backup_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    path = tmp_path / "log"
    (tmp_path / "log.1").symlink_to(victim)
    sink = SafeFileSink(str(path), max_bytes=10, backups=1)
    sink.write("0123456789")
    sink.write("abc")  # rotates: log -> log.1 (the link is replaced, not followed)
    sink.close()
    assert victim.read_text() == "keep\n"
    assert not (tmp_path / "log.1").is_symlink()
    assert (tmp_path / "log.1").read_text() == "0123456789"
    assert path.read_text() == "abc"


def test_setup_logging_survives_an_unsafe_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = tmp_path / "log"
    link.symlink_to(tmp_path / "elsewhere")
    assert setup_logging(str(link)) is None
    out = capsys.readouterr().err
    assert "not logging to a file" in out
    logger.info("still logging to stderr")
    assert "still logging to stderr" in capsys.readouterr().err


def test_setup_logging_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "log"
    sink = setup_logging(str(path), json=True)
    assert sink is not None
    logger.bind(pid=42).info("protected postmaster pid={}", 42)
    sink.close()
    record = json.loads(path.read_text().splitlines()[-1])
    assert record["record"]["extra"]["pid"] == 42
    assert "protected postmaster pid=42" in record["text"]
