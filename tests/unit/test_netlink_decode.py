"""Decoding proc connector datagrams, built byte by byte as the kernel lays them out
(include/uapi/linux/netlink.h, connector.h, cn_proc.h)."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from watcher.sources.base import Examine, Forked
from watcher.sources.netlink import (
    PROC_CN_MCAST_IGNORE,
    PROC_CN_MCAST_LISTEN,
    Ack,
    _control_message,
    decode,
    kernel_filters_events,
)

EVENT_DATA_BYTES = 24  # sizeof the proc_event union on current kernels: 40-byte proc_event


def datagram(
    what: int,
    union: bytes,
    ts_ns: int = 123_456_789,
    ack: int = 0,
    idx: int = 1,
    val: int = 1,
    nl_type: int = 3,
) -> bytes:
    union = union.ljust(EVENT_DATA_BYTES, b"\0")
    event = struct.pack("=IIQ", what, 1, ts_ns) + union
    cn = struct.pack("=IIIIHH", idx, val, 7, ack, len(event), 0) + event
    return struct.pack("=IHHII", 16 + len(cn), nl_type, 0, 7, 0) + cn


def exec_event(pid: int, tgid: int, ts_ns: int = 123_456_789) -> bytes:
    return datagram(0x2, struct.pack("=II", pid, tgid), ts_ns)


def fork_event(ppid: int, ptgid: int, cpid: int, ctgid: int) -> bytes:
    return datagram(0x1, struct.pack("=IIII", ppid, ptgid, cpid, ctgid), 55)


def test_exec_yields_examine_of_the_tgid_with_the_kernel_timestamp() -> None:
    data = exec_event(4242, 4242, ts_ns=987_654_321_000)
    assert len(data) == 76  # what the kernel sends today
    assert decode(data) == [Examine(4242, 987_654_321_000)]


def test_exec_from_a_thread_names_the_thread_group() -> None:
    assert decode(exec_event(5001, 5000)) == [Examine(5000, 123_456_789)]


def test_fork_of_a_process_yields_forked_parent_tgid_and_child() -> None:
    assert decode(fork_event(100, 100, 200, 200)) == [Forked(100, 200, 55)]
    # The parent may fork from one of its threads: the parent's tgid is what counts.
    assert decode(fork_event(101, 100, 201, 201)) == [Forked(100, 201, 55)]


def test_a_new_thread_is_not_a_fork() -> None:
    assert decode(fork_event(100, 100, 301, 100)) == []


def test_ack_carries_the_ack_number_and_errno() -> None:
    assert decode(datagram(0x0, struct.pack("=I", 0), ack=778)) == [Ack(778, 0)]
    assert decode(datagram(0x0, struct.pack("=I", 22), ack=5)) == [Ack(5, 22)]


def test_other_events_are_skipped() -> None:
    exit_event = datagram(0x80000000, struct.pack("=IIIIII", 9, 9, 0, 17, 1, 1))
    comm_event = datagram(0x200, struct.pack("=II", 9, 9) + b"postgres".ljust(16, b"\0"))
    assert decode(exit_event) == []
    assert decode(comm_event) == []


def test_several_messages_in_one_datagram() -> None:
    data = exec_event(1, 1) + fork_event(1, 1, 2, 2) + exec_event(2, 2)
    assert decode(data) == [Examine(1, 123_456_789), Forked(1, 2, 55), Examine(2, 123_456_789)]


def test_nbytes_limits_what_is_read_from_a_reused_buffer() -> None:
    buffer = bytearray(4096)
    first = exec_event(10, 10)
    buffer[: len(first)] = first
    buffer[len(first) : 2 * len(first)] = exec_event(11, 11)  # stale bytes of an old datagram
    assert decode(memoryview(buffer), len(first)) == [Examine(10, 123_456_789)]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0",
        b"\xff" * 51,  # shorter than the fixed 52-byte header
        exec_event(1, 1)[:60],  # truncated: nlmsg_len says 76
        exec_event(1, 1)[:52],  # header only, no union
        struct.pack("=IHHII", 8, 3, 0, 0, 0) + b"\0" * 60,  # nlmsg_len below the header
        struct.pack("=IHHII", 0xFFFFFFFF, 3, 0, 0, 0) + b"\0" * 60,  # nlmsg_len past the end
        datagram(0x2, struct.pack("=II", 1, 1), idx=2),  # another connector (not CN_IDX_PROC)
        datagram(0x2, struct.pack("=II", 1, 1), val=9),
        datagram(0x2, struct.pack("=II", 1, 1), nl_type=2),  # NLMSG_ERROR, not an event
        bytes(range(256)) * 3,  # garbage
    ],
)
def test_short_or_garbage_datagrams_decode_to_nothing(data: bytes) -> None:
    assert decode(data) == []


def test_cn_len_larger_than_the_message_is_rejected() -> None:
    data = bytearray(exec_event(1, 1))
    struct.pack_into("=H", data, 16 + 16, 400)  # cn_msg.len
    assert decode(bytes(data)) == []


def test_a_garbage_tail_does_not_hide_the_good_message_before_it() -> None:
    assert decode(exec_event(3, 3) + b"\x01\x02\x03") == [Examine(3, 123_456_789)]


@pytest.mark.parametrize(
    ("release", "filters"),
    [
        ("6.18.0-fc", True),
        ("6.6.0", True),
        ("6.10.14-linuxkit", True),
        ("6.5.13-arch1", False),
        ("5.15.0-91-generic", False),
        ("7.0", True),
        ("garbage", False),
    ],
)
def test_kernel_filter_support_by_release(release: str, filters: bool) -> None:
    assert kernel_filters_events(release) is filters


def test_control_messages_have_the_kernel_layout() -> None:
    listen = _control_message(PROC_CN_MCAST_LISTEN, ack=777)
    length, nl_type, _flags, _seq, _pid = struct.unpack_from("=IHHII", listen)
    idx, val, _cn_seq, ack, cn_len, _cn_flags = struct.unpack_from("=IIIIHH", listen, 16)
    assert (length, nl_type, idx, val, ack, cn_len) == (40, 3, 1, 1, 777, 4)
    assert len(listen) == 40
    assert struct.unpack_from("=I", listen, 36) == (PROC_CN_MCAST_LISTEN,)

    narrow = _control_message(PROC_CN_MCAST_LISTEN, ack=0, event_mask=0x3)
    assert len(narrow) == 44
    assert struct.unpack_from("=IHHII", narrow)[0] == 44
    assert struct.unpack_from("=H", narrow, 32) == (8,)  # cn_msg.len: struct proc_input
    assert struct.unpack_from("=II", narrow, 36) == (PROC_CN_MCAST_LISTEN, 0x3)

    ignore = _control_message(PROC_CN_MCAST_IGNORE, ack=0)
    assert struct.unpack_from("=I", ignore, 36) == (PROC_CN_MCAST_IGNORE,)


def test_the_light_pyroute2_import_leaves_the_whole_package_usable() -> None:
    """The connector classes load without pyroute2/__init__.py (RSS), yet a later
    `from pyroute2 import IPRoute` in the same process still gets the real package."""
    code = (
        "import sys\n"
        "from watcher.sources.netlink import _control_message, _pyroute2_connector\n"
        "_pyroute2_connector()\n"
        "assert 'pyroute2.ndb' not in sys.modules, 'pyroute2/__init__ ran'\n"
        "assert len(_control_message(1, 5)) == 40\n"
        "from pyroute2 import IPRoute\n"
        "import pyroute2\n"
        "assert pyroute2.IPRoute is IPRoute and 'pyroute2.ndb' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
