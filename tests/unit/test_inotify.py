"""The inotify source's pure parts: record decoding, and the postmaster.pid state machine
driven by synthesized records over files in a temporary directory (the kernel side is in
tests/integration/test_inotify.py)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from watcher.sources.base import Examine, Rescan
from watcher.sources.inotify import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_IGNORED,
    IN_ISDIR,
    IN_MODIFY,
    IN_Q_OVERFLOW,
    InotifySource,
    RawEvent,
    decode_events,
    nearest_existing_dir,
)


def record(wd: int, mask: int, name: bytes = b"", cookie: int = 0, pad_to: int = 16) -> bytes:
    """One struct inotify_event as the kernel lays it out: name NUL-terminated and padded."""
    if name:
        length = (len(name) + 1 + pad_to - 1) // pad_to * pad_to
        padded = name + b"\0" * (length - len(name))
    else:
        length, padded = 0, b""
    return struct.pack("=iIII", wd, mask, cookie, length) + padded


def test_decode_single_record_with_padding() -> None:
    buf = record(3, IN_CREATE, b"postmaster.pid")
    assert len(buf) == 16 + 16  # 14 chars + NUL fit one 16-byte slot
    assert decode_events(buf) == [RawEvent(3, IN_CREATE, 0, "postmaster.pid")]


def test_decode_several_records_in_one_read() -> None:
    buf = (
        record(1, IN_CREATE, b"postmaster.pid")
        + record(1, IN_MODIFY, b"postmaster.pid")
        + record(1, IN_CLOSE_WRITE, b"postmaster.pid")
        + record(2, IN_IGNORED)
        + record(-1, IN_Q_OVERFLOW)
    )
    events = decode_events(buf)
    assert [(e.wd, e.mask, e.name) for e in events] == [
        (1, IN_CREATE, "postmaster.pid"),
        (1, IN_MODIFY, "postmaster.pid"),
        (1, IN_CLOSE_WRITE, "postmaster.pid"),
        (2, IN_IGNORED, ""),
        (-1, IN_Q_OVERFLOW, ""),
    ]


def test_decode_keeps_cookie_and_isdir_flag() -> None:
    (event,) = decode_events(record(7, IN_CREATE | IN_ISDIR, b"pg16", cookie=42))
    assert event == RawEvent(7, IN_CREATE | IN_ISDIR, 42, "pg16")


def test_decode_long_and_hostile_names() -> None:
    long_name = b"x" * 255  # NAME_MAX
    hostile = b"post\xffmaster.pid"  # not UTF-8: must survive, not raise
    events = decode_events(record(1, IN_CREATE, long_name) + record(1, IN_CREATE, hostile))
    assert events[0].name == "x" * 255
    assert os.fsencode(events[1].name) == hostile
    assert events[1].name != "postmaster.pid"


def test_decode_drops_a_truncated_tail() -> None:
    whole = record(1, IN_MODIFY, b"postmaster.pid")
    assert decode_events(whole + whole[:20]) == decode_events(whole)
    assert decode_events(whole[:10]) == []
    assert decode_events(b"") == []


def test_nearest_existing_dir(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    assert nearest_existing_dir(str(tmp_path / "a" / "b" / "c")) == str(tmp_path / "a")
    assert nearest_existing_dir(str(tmp_path / "a")) == str(tmp_path / "a")
    (tmp_path / "file").write_text("")
    # A regular file where a directory should be: wait on its parent.
    assert nearest_existing_dir(str(tmp_path / "file" / "x")) == str(tmp_path)
    assert nearest_existing_dir("/") == "/"


# --- the state machine, fed synthesized records ------------------------------------------

WD = 5


@pytest.fixture
def armed(tmp_path: Path) -> tuple[InotifySource, Path, Path]:
    """A source with one data directory marked as watched by descriptor WD (no kernel
    watch: records are handed to it directly), and a fake /proc with PIDs 4242 and 4343."""
    data_dir = tmp_path / "pg"
    data_dir.mkdir()
    proc = tmp_path / "proc"
    for pid in ("4242", "4343"):
        (proc / pid).mkdir(parents=True)
    source = InotifySource([str(data_dir)], proc_root=str(proc))
    state = source._dirs[str(data_dir)]
    state.wd = WD
    source._watches[str(data_dir)] = WD
    source._paths[WD] = {str(data_dir)}
    return source, data_dir, proc


def feed(source: InotifySource, *masks: int, name: str = "postmaster.pid") -> list[object]:
    return list(source._handle([RawEvent(WD, m, 0, name) for m in masks], ts_ns=123))


def test_create_empty_then_writes_announce_once(armed: tuple[InotifySource, Path, Path]) -> None:
    source, data_dir, _ = armed
    pidfile = data_dir / "postmaster.pid"
    pidfile.write_text("")
    assert feed(source, IN_CREATE) == []  # empty: nothing to announce yet
    pidfile.write_text("42")
    assert feed(source, IN_MODIFY) == []  # line 1 not newline-terminated: half-written
    pidfile.write_text(f"4242\n{data_dir}\n1700000000\n5432\n")
    assert feed(source, IN_MODIFY, IN_CLOSE_WRITE) == [Examine(4242, 123)]
    # PostgreSQL keeps appending lines (~6 writes): no flood of examines.
    assert feed(source, IN_MODIFY, IN_CLOSE_WRITE, IN_MODIFY, IN_CLOSE_WRITE) == []
    assert source.stats()["examines"] == 1


def test_clean_stop_then_new_start_announces_the_new_pid(
    armed: tuple[InotifySource, Path, Path],
) -> None:
    source, data_dir, _ = armed
    pidfile = data_dir / "postmaster.pid"
    pidfile.write_text("4242\n")
    assert feed(source, IN_CREATE, IN_MODIFY) == [Examine(4242, 123)]
    pidfile.unlink()
    assert feed(source, IN_DELETE) == []
    pidfile.write_text("4343\n")
    assert feed(source, IN_CREATE, IN_MODIFY, IN_CLOSE_WRITE) == [Examine(4343, 123)]


def test_restart_with_the_same_pid_is_announced_again(
    armed: tuple[InotifySource, Path, Path],
) -> None:
    """PID reuse across a stop/start: a new file generation, so a new announcement."""
    source, data_dir, _ = armed
    pidfile = data_dir / "postmaster.pid"
    pidfile.write_text("4242\n")
    assert feed(source, IN_CREATE, IN_CLOSE_WRITE) == [Examine(4242, 123)]
    assert feed(source, IN_DELETE, IN_CREATE, IN_CLOSE_WRITE) == [Examine(4242, 123)]


def test_stale_file_at_start_is_not_announced_but_a_rewrite_is(
    armed: tuple[InotifySource, Path, Path],
) -> None:
    """A file present before the watch is not trusted; a write to it (crash-restart: only a
    live postmaster writes its lock file) is."""
    source, data_dir, _ = armed
    (data_dir / "postmaster.pid").write_text("4242\n")
    assert source.read() == []  # not opened: nothing to read, nothing announced
    assert feed(source, IN_MODIFY, IN_CLOSE_WRITE) == [Examine(4242, 123)]
    assert feed(source, IN_MODIFY, IN_CLOSE_WRITE) == []


def test_other_files_are_ignored(armed: tuple[InotifySource, Path, Path]) -> None:
    source, data_dir, _ = armed
    (data_dir / "postmaster.opts").write_text("4242\n")
    assert feed(source, IN_CREATE, IN_MODIFY, name="postmaster.opts") == []


def test_pid_not_visible_here_asks_for_a_rescan(armed: tuple[InotifySource, Path, Path]) -> None:
    """The file holds a PID from another PID namespace: never act on it, scan instead."""
    source, data_dir, _ = armed
    (data_dir / "postmaster.pid").write_text("77\n")
    events = feed(source, IN_CREATE, IN_MODIFY, IN_CLOSE_WRITE)
    assert len(events) == 1 and isinstance(events[0], Rescan)
    assert "77" in events[0].reason


def test_negative_pid_single_user_mode_is_not_announced(
    armed: tuple[InotifySource, Path, Path],
) -> None:
    source, data_dir, _ = armed
    (data_dir / "postmaster.pid").write_text("-4242\n")
    assert feed(source, IN_CREATE, IN_MODIFY) == []


def test_queue_overflow_rescans(armed: tuple[InotifySource, Path, Path]) -> None:
    source, _, _ = armed
    events = source._handle([RawEvent(-1, IN_Q_OVERFLOW, 0, "")], ts_ns=1)
    assert any(isinstance(e, Rescan) and "overflow" in e.reason for e in events)


def test_unknown_watch_descriptor_is_ignored(armed: tuple[InotifySource, Path, Path]) -> None:
    source, data_dir, _ = armed
    (data_dir / "postmaster.pid").write_text("4242\n")
    assert source._handle([RawEvent(99, IN_MODIFY, 0, "postmaster.pid")], ts_ns=1) == []
