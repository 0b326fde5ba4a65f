"""The proc connector (netlink, NETLINK_CONNECTOR / CN_IDX_PROC): the kernel tells us about
every exec (and, with --children-score, every fork) as it happens.

Setup goes through pyroute2 (socket, bind, control messages); the hot path does not. Why,
measured on this project's machine kind with pyroute2 0.9.7 (docs/benchmarks.md, netlink):
- `ProcEventSocket.get()` costs ~10x the CPU of a struct decode (12.1 s vs 1.3 s for 60k
  events; scripts/benchmarks/netlink.py: 150-200 us vs 4-6 us per event draining a backlog): in
  a fork storm the watcher would fall behind and overflow its buffer;
- it must be called from the thread that created the socket;
- it buffers messages internally, so select() on its descriptor can report "idle" while
  events wait inside pyroute2: an event loop built on the fd would sit on a postmaster;
- after one ENOBUFS every later get() raises again: one overflow would end the source.
So events are read with recv_into() into one preallocated buffer and decoded with
struct.unpack_from() by `decode()`, a pure function over bytes.

Subscription rules (FACTS.md, "Netlink proc connector"):
- the kernel acknowledges LISTEN only from the initial user *and* pid namespace; elsewhere
  the request is silently dropped and the socket may still receive events carrying host
  PIDs, which mean nothing (or someone else) here. No ack within `ack_timeout_s` therefore
  means "unavailable", and nothing read before our ack is acted on;
- in a non-initial network namespace send() fails with ECONNREFUSED;
- on 6.6+ a second LISTEN with a `struct proc_input` (cn_msg.len 8) narrows delivery to the
  events we need; the kernel filters the ack out too, which is why the legacy 4-byte LISTEN
  goes first. A repeated LISTEN from the same socket does not bump the kernel's listener
  count, so retrying or narrowing is safe;
- IGNORE before close: only IGNORE decrements the kernel's global listener count, and while
  it is above zero every fork/exec/exit on the host builds an event.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import os
import random
import socket
import struct
import sys
import time
import types
from dataclasses import dataclass
from typing import Any, Optional, Union

from loguru import logger

from watcher.errors import SourceUnavailable
from watcher.limits import PROC_INPUT_KERNEL
from watcher.parse import kernel_version
from watcher.sources.base import Event, Examine, Forked, Rescan

# include/uapi/linux/connector.h, cn_proc.h
NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
NLMSG_DONE = 3
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
PROC_EVENT_NONE = 0x0  # the reply to a control message (the "ack")
PROC_EVENT_FORK = 0x1
PROC_EVENT_EXEC = 0x2
SO_RCVBUFFORCE = 33  # not exported by the socket module; root may exceed rmem_max with it

# nlmsghdr(16) + cn_msg(20) + proc_event header (what, cpu, timestamp_ns) = 52 bytes; the
# per-event union starts at byte 52.
_HEADER = struct.Struct("=IHHI4xIIIIHHIIQ")
_HEADER_SIZE = _HEADER.size  # 52
_EXEC = struct.Struct("=II")  # process_pid, process_tgid
_FORK = struct.Struct("=IIII")  # parent_pid, parent_tgid, child_pid, child_tgid
_ACK = struct.Struct("=I")  # err
_CN_OFFSET = 16  # cn_msg starts after nlmsghdr
_CN_SIZE = 20

# One datagram carries one event of 76 bytes today; 64 KiB is plenty for any batch the
# kernel might pack, and is allocated once.
RECV_BUFFER_BYTES = 65536
# Datagrams per read(): bounded so that a sustained storm cannot keep the engine from
# acting on what it has already read.
MAX_DATAGRAMS_PER_READ = 4096
# ENOBUFS can repeat many times a second in a storm: one warning per interval, with counts.
ENOBUFS_WARN_INTERVAL_S = 10.0


@dataclass(frozen=True)
class Ack:
    """The kernel's reply to a control message: cn_msg.ack is the request's ack + 1."""

    ack: int
    err: int


Decoded = Union[Examine, Forked, Ack]


def decode(
    data: Union[bytes, bytearray, memoryview], nbytes: Optional[int] = None
) -> list[Decoded]:
    """Decode one datagram from the proc connector: EXEC → Examine(tgid), FORK of a process
    (not a thread) → Forked, control replies → Ack. Anything else, short or malformed, is
    skipped: a bad datagram must never stop the reader."""
    out: list[Decoded] = []
    _decode_into(data, len(data) if nbytes is None else nbytes, out)
    return out


def _decode_into(data: Union[bytes, bytearray, memoryview], nbytes: int, out: list[Any]) -> int:
    """Append decoded events to `out`; returns how many messages were skipped as malformed.

    The socket only accepts datagrams from the kernel (see _open_socket); even a forged
    one could at worst make the engine *examine* a PID, which it verifies from /proc."""
    skipped = 0
    offset = 0
    while nbytes - offset >= _HEADER_SIZE:
        (
            msg_len,
            msg_type,
            _flags,
            _seq,
            idx,
            val,
            _cn_seq,
            cn_ack,
            cn_len,
            _cn_flags,
            what,
            _cpu,
            ts_ns,
        ) = _HEADER.unpack_from(data, offset)
        if msg_len < _HEADER_SIZE or offset + msg_len > nbytes:
            return skipped + 1  # truncated or nonsense length: nothing after it is trustworthy
        end = offset + msg_len
        if (
            msg_type == NLMSG_DONE
            and idx == CN_IDX_PROC
            and val == CN_VAL_PROC
            and _CN_OFFSET + _CN_SIZE + cn_len <= msg_len
        ):
            body = offset + _HEADER_SIZE
            if what == PROC_EVENT_EXEC and end - body >= _EXEC.size:
                # process_tgid: an exec from a thread makes that thread the group leader.
                out.append(Examine(_EXEC.unpack_from(data, body)[1], ts_ns))
            elif what == PROC_EVENT_FORK and end - body >= _FORK.size:
                _ppid, parent_tgid, child_pid, child_tgid = _FORK.unpack_from(data, body)
                if child_pid == child_tgid:  # a new process, not a new thread
                    out.append(Forked(parent_tgid, child_tgid, ts_ns))
            elif what == PROC_EVENT_NONE and end - body >= _ACK.size:
                out.append(Ack(cn_ack, _ACK.unpack_from(data, body)[0]))
            # EXIT, UID, COMM, ...: delivered on kernels without the filter; not needed.
        else:
            skipped += 1
        offset += (msg_len + 3) & ~3  # NLMSG_ALIGN
    if offset < nbytes:
        skipped += 1
    return skipped


def kernel_filters_events(release: str) -> bool:
    """proc_input filtering exists since Linux 6.6 (`release` as in uname -r)."""
    version = kernel_version(release)
    return version is not None and version >= PROC_INPUT_KERNEL


def _pyroute2_connector() -> tuple[Any, Any, Any]:
    """pyroute2's connector classes (cn_msg, proc_event_control, ProcEventSocket).

    pyroute2/__init__.py eagerly imports IPRoute, NDB, IPDB and, through them, ssl: ~12 MB
    of RSS against a 40 MB budget, for three classes that need none of it (measured here:
    +10.4 MB with the package's __init__, +1.8 MB without). So when nothing has imported
    pyroute2 yet, a bare package module stands in for it while the connector submodules
    load; the first attribute asked of it (`from pyroute2 import IPRoute`) runs the real
    __init__ into it, so other users of pyroute2 in this process see the whole package."""
    if "pyroute2" not in sys.modules:
        spec = importlib.util.find_spec("pyroute2")
        if spec is not None and spec.loader is not None and spec.submodule_search_locations:
            package = types.ModuleType("pyroute2")
            package.__spec__ = spec
            package.__file__ = spec.origin
            package.__path__ = list(spec.submodule_search_locations)
            loader = spec.loader

            def complete(name: str) -> Any:
                if importlib.util.find_spec(f"pyroute2.{name}") is not None:
                    return importlib.import_module(
                        f"pyroute2.{name}"
                    )  # `from pyroute2 import netns`
                del package.__getattr__
                loader.exec_module(package)
                return getattr(package, name)

            package.__getattr__ = complete  # type: ignore[method-assign]
            sys.modules["pyroute2"] = package
    from pyroute2.netlink.connector import cn_msg
    from pyroute2.netlink.connector.cn_proc import ProcEventSocket, proc_event_control

    return cn_msg, proc_event_control, ProcEventSocket


def _control_message(op: int, ack: int, event_mask: Optional[int] = None) -> bytes:
    """Encode a control message with pyroute2's message classes: the legacy 4-byte form
    (`event_mask` None) or the 6.6+ `struct proc_input` form (cn_msg.len 8)."""
    cn_msg, proc_event_control, _sock = _pyroute2_connector()
    msg: Any
    if event_mask is None:
        msg = proc_event_control()
        msg["action"] = op
        msg["len"] = 4
    else:

        class proc_input(cn_msg):  # type: ignore[misc,valid-type]  # pyroute2 is untyped
            fields = (*cn_msg.fields, ("mcast_op", "I"), ("event_type", "I"))

        msg = proc_input()
        msg["mcast_op"] = op
        msg["event_type"] = event_mask
        msg["len"] = 8
    msg["header"]["type"] = NLMSG_DONE
    msg["header"]["flags"] = 0
    msg["header"]["sequence_number"] = 0
    msg["header"]["pid"] = 0
    msg["idx"] = CN_IDX_PROC
    msg["val"] = CN_VAL_PROC
    msg["seq"] = 0
    msg["ack"] = ack
    msg["flags"] = 0
    msg.encode()
    return bytes(msg.data)


def _open_socket() -> socket.socket:
    """Create and bind the connector socket with pyroute2, then keep only a plain socket on
    a duplicate of its descriptor: pyroute2's object carries an asyncio loop we never use."""
    _msg, _ctl, ProcEventSocket = _pyroute2_connector()
    pr2 = ProcEventSocket()
    try:
        pr2.bind()
        sock = socket.socket(fileno=os.dup(pr2.fileno()))
    finally:
        pr2.close()
    try:
        # Connected to the kernel (port 0), the socket refuses unicast datagrams from any
        # other process (ECONNREFUSED for the sender): no local user can inject a fake ack
        # or event. Multicast delivery from the kernel is not affected.
        sock.connect((0, 0))
    except OSError:
        sock.close()
        raise
    return sock


class NetlinkSource:
    name = "netlink"
    reports_forks = True

    def __init__(self, rcvbuf_bytes: int, ack_timeout_s: float, want_forks: bool = False) -> None:
        self.rcvbuf_bytes = rcvbuf_bytes
        self.ack_timeout_s = ack_timeout_s
        self.want_forks = want_forks
        self._sock: Optional[socket.socket] = None
        self._listening = False  # a LISTEN was sent: IGNORE is owed at close
        self._buffer = bytearray(RECV_BUFFER_BYTES)
        self._view = memoryview(self._buffer)
        self.filtered = False
        self.rcvbuf_effective_bytes = 0
        self._counters = {
            "datagrams": 0,
            "events": 0,
            "enobufs": 0,
            "rescans": 0,
            "malformed": 0,
            "before_ack": 0,
        }
        self._enobufs_warned_at = 0.0
        self._enobufs_unreported = 0

    # --- subscribing ---------------------------------------------------------------------

    def open(self) -> None:
        try:
            self._sock = _open_socket()
        except OSError as err:
            raise SourceUnavailable(
                f"cannot open a proc connector socket: {os.strerror(err.errno or 0)}"
            ) from None
        except KeyError:
            # pyroute2 retries a refused bind() on other ports and then raises KeyError('no
            # free address available'). Before Linux 6.6 joining the proc connector's group
            # needs CAP_NET_ADMIN: found by the VM test (Debian 12, kernel 6.1, the shipped
            # systemd unit), where this was a traceback and a restart loop.
            raise SourceUnavailable(
                "cannot join the proc connector's multicast group (before Linux 6.6 this "
                "needs CAP_NET_ADMIN)"
            ) from None
        try:
            self._raise_rcvbuf(self._sock)
            self._subscribe(self._sock)
            if kernel_filters_events(os.uname().release):
                mask = PROC_EVENT_EXEC | (PROC_EVENT_FORK if self.want_forks else 0)
                self._send(self._sock, _control_message(PROC_CN_MCAST_LISTEN, 0, mask))
                self.filtered = True
            self._sock.setblocking(False)
        except BaseException:
            self.close()
            raise
        logger.debug(
            "netlink: subscribed, receive buffer {} bytes, events {}",
            self.rcvbuf_effective_bytes,
            ("exec+fork" if self.want_forks else "exec") if self.filtered else "all (no filter)",
        )

    def _raise_rcvbuf(self, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf_bytes)
        except PermissionError:
            # Without CAP_NET_ADMIN the kernel caps SO_RCVBUF at net.core.rmem_max.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf_bytes)
        self.rcvbuf_effective_bytes = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if self.rcvbuf_effective_bytes < self.rcvbuf_bytes:
            logger.warning(
                "netlink: receive buffer is {} bytes, not the {} asked for (needs root or a "
                "larger net.core.rmem_max): a fork storm may lose events (then /proc is rescanned)",
                self.rcvbuf_effective_bytes,
                self.rcvbuf_bytes,
            )

    def _send(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.send(data)
        except ConnectionRefusedError:
            raise SourceUnavailable(
                "the proc connector refused the subscription (ECONNREFUSED): "
                "non-initial network namespace"
            ) from None
        except OSError as err:
            raise SourceUnavailable(
                f"cannot subscribe to the proc connector: {os.strerror(err.errno or 0)}"
            ) from None

    def _subscribe(self, sock: socket.socket) -> None:
        """Send LISTEN and wait for *our* ack (acks are multicast: other subscribers' acks
        arrive too, told apart by the ack number). Everything before it is discarded."""
        deadline = time.monotonic() + self.ack_timeout_s
        ack = random.randrange(1, 1 << 31)
        self._listening = True  # from here on the kernel may count us: IGNORE at close
        self._send(sock, _control_message(PROC_CN_MCAST_LISTEN, ack))
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SourceUnavailable(
                    f"no ack from the proc connector within {self.ack_timeout_s:g} s: "
                    "not in the initial pid/user namespace"
                )
            sock.settimeout(remaining)
            try:
                nbytes = sock.recv_into(self._buffer)
            except (socket.timeout, BlockingIOError, InterruptedError):
                continue
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise SourceUnavailable(
                        f"proc connector socket failed: {os.strerror(err.errno or 0)}"
                    ) from None
                # The ack itself may be among the lost: ask again (no double counting).
                ack = random.randrange(1, 1 << 31)
                self._send(sock, _control_message(PROC_CN_MCAST_LISTEN, ack))
                continue
            for item in decode(self._view, nbytes):
                if isinstance(item, Ack) and item.ack == (ack + 1) & 0xFFFFFFFF:
                    if item.err:
                        raise SourceUnavailable(
                            f"the proc connector rejected LISTEN: {os.strerror(item.err)}"
                        )
                    return
                self._counters["before_ack"] += 1

    # --- the hot path --------------------------------------------------------------------

    def fileno(self) -> Optional[int]:
        return self._sock.fileno() if self._sock is not None else None

    def timeout_s(self) -> Optional[float]:
        return None

    def read(self) -> list[Event]:
        sock = self._sock
        if sock is None:
            return []
        out: list[Any] = []
        buf, view, counters = self._buffer, self._view, self._counters
        lost = False
        datagrams = 0
        malformed = 0
        recv_into = sock.recv_into
        while datagrams < MAX_DATAGRAMS_PER_READ:
            try:
                nbytes = recv_into(buf)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    # The kernel dropped events because our buffer was full. recv() keeps
                    # working afterwards; what was lost is recovered by a /proc rescan.
                    lost = True
                    counters["enobufs"] += 1
                    self._enobufs_unreported += 1
                    continue
                raise
            datagrams += 1
            malformed += _decode_into(view, nbytes, out)
        counters["datagrams"] += datagrams
        counters["malformed"] += malformed
        if out and not self.want_forks:
            out = [e for e in out if type(e) is Examine]
        elif out:
            out = [e for e in out if type(e) is not Ack]
        counters["events"] += len(out)
        if lost:
            self._warn_lost()
            counters["rescans"] += 1
            out.append(Rescan("netlink lost events (ENOBUFS)"))
        return out

    def _warn_lost(self) -> None:
        now = time.monotonic()
        if self._enobufs_warned_at and now - self._enobufs_warned_at < ENOBUFS_WARN_INTERVAL_S:
            return
        self._enobufs_warned_at = now
        logger.warning(
            "netlink: receive buffer overflowed (ENOBUFS) {} time(s) since the last warning, "
            "{} in all: events were lost, rescanning /proc (a larger --rcvbuf than {} bytes "
            "avoids this)",
            self._enobufs_unreported,
            self._counters["enobufs"],
            self.rcvbuf_effective_bytes,
        )
        self._enobufs_unreported = 0

    # --- the rest of the interface -------------------------------------------------------

    def add_data_dir(self, path: str) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {**self._counters, "rcvbuf_bytes": self.rcvbuf_effective_bytes}

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            if self._listening:
                self._listening = False
                try:
                    sock.send(_control_message(PROC_CN_MCAST_IGNORE, 0))
                except OSError as err:
                    logger.debug("netlink: IGNORE not sent: {}", os.strerror(err.errno or 0))
        finally:
            sock.close()
