"""The kernel's pressure notifications for one memory group, as file descriptors to poll.

No timer and no polling while memory is fine: each source asks the kernel to wake it.

- cgroup v1: eventfds registered through cgroup.event_control: a threshold on
  memory.usage_in_bytes (fires when usage crosses it, in *either* direction), a listener on
  memory.pressure_level (fires on reclaim: the only signal left when page cache keeps usage
  pinned at the limit while private memory grows under it), and memory.oom_control (the
  kernel's OOM killer ran: the guard was too late or had no victim).
- cgroup v2: a PSI trigger on memory.pressure (POLLPRI when tasks stalled on memory for
  longer than the trigger's budget within its window) and memory.events (POLLPRI when a
  counter such as `max` or `oom_kill` changes), opened twice: "events" for the counters
  that mean pressure, "oom" when the kernel's OOM killer ran (v1's memory.oom_control).
  Measured in the VM (docs/guard.md, cgroup v2): both wake only once usage is at
  memory.max; nothing on v2 notifies below the limit unless memory.high is set.
- the bare host: a PSI trigger on /proc/pressure/memory.

Each wakeup is only a reason to take a Sample: the guard decides on the working set, never
on the notification alone (a v1 threshold also fires on the way down).

memory.pressure_level fires on every reclaim pass, so a registration carries `quiet_s`: after
one of its wakeups read the working set below the threshold, the guard stops listening to
that fd for up to this long (`quiet_for_s()`: less the closer the working set is to the
threshold) and then takes whatever arrived meanwhile as one wakeup (watcher.guard.Guards
does the listening; `Quiet` keeps the times).
"""

from __future__ import annotations

import errno
import os
import select
from dataclasses import dataclass
from typing import Optional

from watcher.guard.memory import MemoryGroup
from watcher.memcg import parse_flat_keyed

# A PSI trigger: wake when tasks of the group were stalled on memory for STALL_US in any
# WINDOW_US. Unprivileged writers need a window that is a multiple of 2 s; root may use 1 s.
PSI_STALL_US = 50_000
PSI_WINDOW_US = 1_000_000
PSI_UNPRIVILEGED_WINDOW_US = 2_000_000
# v1 vmpressure under page-cache churn at the limit: 215-260 wakeups a second, each reading
# the working set where it was (docs/guard.md, "Wakeups under page-cache churn"). After one that
# read below the threshold, the guard does not listen to it for as long as the working set
# needs to reach the threshold growing at FASTEST_GROWTH_BYTES_PER_S, and at most this long.
# The usage thresholds stay armed, but they do not help here: with cache holding usage at the
# limit, private memory grows under it without crossing any, so the bound comes from the
# headroom (measured: with vmpressure unheard for a flat 50 ms, runaway queries under churn
# reached the kernel's OOM killer in 2 of 5 runs).
VMPRESSURE_QUIET_S = 0.05
# Twice the fastest growth measured here: a runaway array_agg under page-cache churn grew the
# working set by up to 500 MB/s over 10 ms (260 MB/s over 50 ms).
FASTEST_GROWTH_BYTES_PER_S = 1 << 30
# cgroup v2 has no usage threshold, and its PSI and memory.events wake the guard only once
# usage is at memory.max (measured in the VM: every decision at 298-300 of 300 MiB, and with
# ~50 backends in the group the kernel's reclaim at the limit ended before the guard could
# choose). So on v2 the guard also reads the group itself, paced by the headroom: the next
# reading comes before the working set could reach the threshold growing at
# FASTEST_GROWTH_BYTES_PER_S, at least this often and at most this often. The cost while
# memory is fine is that many wakeups (docs/guard.md, "cgroup v2").
V2_SAMPLE_LONGEST_S = 1.0
V2_SAMPLE_SHORTEST_S = 0.01


def next_sample_in_s(working_set_bytes: int, threshold_bytes: int) -> float:
    """When a v2 group is read next after a reading of `working_set_bytes`. At or above the
    threshold the guard has just decided (or found nothing it may stop): the kernel's own
    notifications cover the limit, and a decision every few milliseconds would read every
    task of the group again each time."""
    if working_set_bytes >= threshold_bytes:
        return V2_SAMPLE_LONGEST_S
    return max(
        V2_SAMPLE_SHORTEST_S,
        quiet_for_s(working_set_bytes, threshold_bytes, V2_SAMPLE_LONGEST_S),
    )


class PressureUnavailable(RuntimeError):
    """The group cannot notify (no cgroup.event_control, no PSI): the guard cannot watch it."""


@dataclass(frozen=True)
class Registration:
    fd: int
    mask: int  # epoll events: EPOLLIN for eventfds, EPOLLPRI for PSI and kernfs files
    signal: str  # "threshold", "vmpressure", "oom", "psi", "events"
    quiet_s: float = 0.0  # longest not listened to after a wakeup below the threshold


def quiet_for_s(working_set_bytes: int, threshold_bytes: int, longest_s: float) -> float:
    """How long a notification need not be listened to after a reading of `working_set_bytes`:
    the time the working set needs to reach the threshold at FASTEST_GROWTH_BYTES_PER_S, so
    the next reading comes before it can get there; 0 at or above the threshold."""
    headroom_bytes = threshold_bytes - working_set_bytes
    if headroom_bytes <= 0 or longest_s <= 0:
        return 0.0
    return min(longest_s, headroom_bytes / FASTEST_GROWTH_BYTES_PER_S)


class Quiet:
    """Which fds are not listened to, until when (monotonic seconds)."""

    def __init__(self) -> None:
        self._until_s: dict[int, float] = {}

    def hush(self, fd: int, now_s: float, for_s: float) -> None:
        self._until_s[fd] = now_s + for_s

    def forget(self, fd: int) -> None:
        self._until_s.pop(fd, None)

    def deadline_s(self) -> Optional[float]:
        """When the next hushed fd is to be heard again; None: nothing is hushed."""
        return min(self._until_s.values(), default=None)

    def due(self, now_s: float) -> list[int]:
        """The fds whose quiet is over at `now_s` (no longer hushed from here on)."""
        fds = [fd for fd, until_s in self._until_s.items() if now_s >= until_s]
        for fd in fds:
            del self._until_s[fd]
        return fds


_EFD_CLOEXEC = 0o2000000  # = O_CLOEXEC
_EFD_NONBLOCK = 0o4000  # = O_NONBLOCK


def _eventfd() -> int:
    """A non-blocking, close-on-exec eventfd. os.eventfd is Python 3.10+; the Percona image's
    python3 is 3.9, so libc's eventfd(2) wrapper through ctypes there."""
    if hasattr(os, "eventfd"):
        fd: int = os.eventfd(0, _EFD_NONBLOCK | _EFD_CLOEXEC)
        return fd
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.eventfd(0, _EFD_NONBLOCK | _EFD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


class PressureSource:
    """Base: a set of registrations, drained on wakeup, closed at the end."""

    description = ""

    def __init__(self) -> None:
        self.registrations: list[Registration] = []

    def drain(self, registration: Registration) -> int:
        """Consume the wakeup (so the fd does not stay ready); the number of notifications."""
        raise NotImplementedError

    def close(self) -> None:
        for registration in self.registrations:
            try:
                os.close(registration.fd)
            except OSError:
                pass
        self.registrations = []


def v1_thresholds(threshold_bytes: int, limit_bytes: int) -> list[int]:
    """Usage thresholds from `threshold_bytes` up to the limit, one per 1 % of the limit.
    One threshold is not enough: when page cache took usage past it (the working set still
    below), the kernel reports no further crossing while private memory grows under the
    cache, and reclaim (vmpressure) may start only at the limit, too late. Measured with the
    OOM harness: one threshold, the first wakeup came at 299 of 300 MiB."""
    step = max(1 << 20, limit_bytes // 100)
    return list(range(threshold_bytes, limit_bytes, step)) or [threshold_bytes]


class V1Pressure(PressureSource):
    def __init__(
        self,
        directory: str,
        threshold_bytes: int,
        limit_bytes: int = 0,
        vmpressure_quiet_s: float = VMPRESSURE_QUIET_S,
    ) -> None:
        super().__init__()
        levels = v1_thresholds(threshold_bytes, limit_bytes or threshold_bytes)
        self.description = (
            f"cgroup v1: {len(levels)} usage threshold(s) from {threshold_bytes >> 20} MiB "
            f"+ vmpressure (quiet up to {vmpressure_quiet_s * 1000:g} ms below the threshold) "
            "+ oom_control"
        )
        try:
            for level in levels:
                self._register(directory, "memory.usage_in_bytes", str(level), "threshold")
            # "low" in the default mode also receives medium and critical.
            self._register(
                directory, "memory.pressure_level", "low", "vmpressure", vmpressure_quiet_s
            )
            self._register(directory, "memory.oom_control", "", "oom")
        except OSError as err:
            self.close()
            raise PressureUnavailable(f"{directory}: cgroup.event_control: {err.strerror}") from err

    def _register(
        self, directory: str, target: str, args: str, signal: str, quiet_s: float = 0.0
    ) -> None:
        efd = _eventfd()
        try:
            tfd = os.open(f"{directory}/{target}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                line = f"{efd} {tfd} {args}".rstrip()
                cfd = os.open(f"{directory}/cgroup.event_control", os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(cfd, line.encode())
                finally:
                    os.close(cfd)
            finally:
                # The kernel keeps only the eventfd; closing that one unregisters the event.
                os.close(tfd)
        except OSError:
            os.close(efd)
            raise
        self.registrations.append(Registration(efd, select.EPOLLIN, signal, quiet_s))

    def drain(self, registration: Registration) -> int:
        try:
            return int.from_bytes(os.read(registration.fd, 8), "little")
        except BlockingIOError:
            return 0


class PsiPressure(PressureSource):
    """A PSI trigger on `pressure_file` (a cgroup's memory.pressure or /proc/pressure/memory),
    plus, for a v2 cgroup, its memory.events."""

    def __init__(self, pressure_file: str, events_file: str = "") -> None:
        super().__init__()
        self._seen: dict[int, tuple[int, int]] = {}  # fd -> OOM counters it last saw
        self._events_file = events_file
        self.description = (
            f"PSI trigger some {PSI_STALL_US // 1000} ms per window on {pressure_file}"
        )
        try:
            psi = self._trigger(pressure_file)
            self.registrations.append(Registration(psi, select.EPOLLPRI, "psi"))
            if events_file:
                # One open file per meaning: kernfs wakes every open file of memory.events
                # on each change, and each compares the counters it last read.
                for signal in ("events", "oom"):
                    fd = os.open(events_file, os.O_RDONLY | os.O_CLOEXEC)
                    self.registrations.append(Registration(fd, select.EPOLLPRI, signal))
                    self._seen[fd] = _oom_counters(self._rearm(fd))
                self._seen[psi] = self._oom_counters_now()
                self.description += " + memory.events"
        except OSError as err:
            self.close()
            raise PressureUnavailable(f"{pressure_file}: {err.strerror}") from err

    @staticmethod
    def _trigger(path: str) -> int:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            try:
                os.write(fd, f"some {PSI_STALL_US} {PSI_WINDOW_US}\0".encode())
            except OSError as err:
                if err.errno not in (errno.EINVAL, errno.EPERM):
                    raise
                os.write(fd, f"some {PSI_STALL_US} {PSI_UNPRIVILEGED_WINDOW_US}\0".encode())
        except OSError:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _rearm(fd: int) -> str:
        # kernfs reports POLLPRI until the file is read again from the start.
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 4096).decode("ascii", "replace")

    def _oom_counters_now(self) -> tuple[int, int]:
        """memory.events read through a file of its own: reading it does not consume the
        notification the "events" and "oom" files are waiting to report."""
        fd = os.open(self._events_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return _oom_counters(os.read(fd, 4096).decode("ascii", "replace"))
        finally:
            os.close(fd)

    def drain(self, registration: Registration) -> int:
        fd = registration.fd
        if fd not in self._seen:
            # The host's PSI trigger: the kernel clears the event when poll reports it.
            return 1
        before = self._seen[fd]
        try:
            if registration.signal == "psi":
                now = self._oom_counters_now()  # PSI itself needs no read
            else:
                now = _oom_counters(self._rearm(fd))
        except OSError:
            return 1  # the cgroup is going away: a wakeup all the same, the guard reads
        self._seen[fd] = now
        killed = now != before
        if registration.signal == "oom":
            return 1 if killed else 0
        # The kernel's OOM killer ran since this file's last look: the stall and the `max`
        # changes came with it, but the group's readings now are of a victim still being
        # reaped (measured in the VM with the OOM harness's hog: the guard then terminated
        # an idle session as "the kernel's next choice"). The "oom" registration reports it.
        return 0 if killed else 1


def _oom_counters(events_text: str) -> tuple[int, int]:
    """memory.events' OOM invocations and kills (oom, oom_kill)."""
    counters = parse_flat_keyed(events_text)
    return counters.get("oom", 0), counters.get("oom_kill", 0)


def open_pressure(
    group: MemoryGroup,
    threshold_bytes: int,
    limit_bytes: int = 0,
    vmpressure_quiet_s: float = VMPRESSURE_QUIET_S,
) -> PressureSource:
    if group.version == 1:
        return V1Pressure(group.directory, threshold_bytes, limit_bytes, vmpressure_quiet_s)
    if group.version == 2:
        return PsiPressure(f"{group.directory}/memory.pressure", f"{group.directory}/memory.events")
    return PsiPressure(f"{group.directory}/pressure/memory")
