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


# --- attacks on the log in a world-writable directory (issue 9, items 5 and 6) ----------


def _write_many(sink: SafeFileSink, count: int, size: int = 50) -> None:
    for i in range(count):
        sink.write(f"{i:05d} " + "x" * (size - 7) + "\n")


@pytest.mark.skipif(not IS_ROOT, reason="files of another uid need root")
def test_rotation_among_names_another_user_planted_never_fails_nor_touches_them(
    tmp_path: Path,
) -> None:
    # As nobody in /tmp: log.2 a file of nobody's, log.3 a directory. On main the rotation
    # closed its fd, failed on the rename and the watcher died.
    os.chmod(tmp_path, 0o1777)
    path = tmp_path / "w.log"
    theirs = tmp_path / "w.log.2"
    theirs.write_text("nobody's\n")
    os.chown(theirs, 65534, 65534)
    (tmp_path / "w.log.3").mkdir()
    os.chown(tmp_path / "w.log.3", 65534, 65534)
    max_bytes, backups = 500, 3
    sink = SafeFileSink(str(path), max_bytes=max_bytes, backups=backups)
    _write_many(sink, 400)
    sink.write("the last line\n")
    sink.close()
    assert theirs.read_text() == "nobody's\n"
    assert os.stat(theirs).st_uid == 65534
    assert (tmp_path / "w.log.3").is_dir() and not any((tmp_path / "w.log.3").iterdir())
    ours = [f for f in tmp_path.iterdir() if f.is_file() and f.stat().st_uid == 0]
    assert sum(f.stat().st_size for f in ours) <= (backups + 1) * max_bytes
    assert path.read_text().endswith("the last line\n")


@pytest.mark.skipif(not IS_ROOT, reason="files of another uid need root")
def test_rotation_when_another_user_takes_the_first_backup_name_keeps_the_bound(
    tmp_path: Path,
) -> None:
    path = tmp_path / "w.log"
    planted = tmp_path / "w.log.1"
    planted.symlink_to("/etc/passwd")
    os.lchown(planted, 65534, 65534)
    sink = SafeFileSink(str(path), max_bytes=300, backups=2)
    _write_many(sink, 100)
    sink.close()
    assert planted.is_symlink() and os.readlink(planted) == "/etc/passwd"
    assert path.stat().st_size <= 300


def test_a_write_that_fails_costs_the_line_not_the_watcher(tmp_path: Path) -> None:
    sink = SafeFileSink(str(tmp_path / "log"))
    os.close(sink._fd)  # as if the descriptor had been closed under the sink
    sink.write("lost\n")  # no exception
    sink.close()
    sink.close()  # and closing twice never closes a number reused by someone else


def test_a_newline_in_a_message_cannot_forge_a_log_line(tmp_path: Path) -> None:
    path = tmp_path / "log"
    sink = setup_logging(str(path))
    assert sink is not None
    argv = "postgres -D /x\n2026-01-01T00:00:00.000+00:00 INFO    pgoom[1] protected postmaster"
    logger.info("not protecting pid 1 ({})", argv)
    long_path = "/tmp/" + "a" * 120_000
    logger.info("data dir {}", long_path)
    sink.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert "\\n2026-01-01" in lines[0]
    assert len(lines[1]) < 5000 and "chars)" in lines[1]
