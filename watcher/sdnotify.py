"""systemd's notify protocol (sd_notify(3)), for `Type=notify` units.

The protocol is one datagram of newline-separated VAR=value lines sent to the AF_UNIX
socket named by $NOTIFY_SOCKET; a name starting with '@' is in the abstract namespace
(the '@' stands for a leading NUL byte). Twenty lines do not justify a dependency.

pgoom sends READY=1 once the source is subscribed and the first scan of /proc is done (the
engine's "ready" event), STATUS= lines as postmasters come and go, and STOPPING=1 on the
way out. It does not send WATCHDOG=1: the engine's idle event loop has no timer by design
(zero wake-ups), and pings from a helper thread would prove only that the process exists,
which systemd already knows.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Optional

from loguru import logger

from watcher.events import Adjusted, Exited, Failed, Notice, Ready


def socket_address(value: str) -> Optional[str]:
    """The sendto() address for a $NOTIFY_SOCKET value; None if pgoom cannot use it."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # e.g. vsock: (systemd 253+ for VMs): not for a host daemon


class Notifier:
    """Sends to $NOTIFY_SOCKET; does nothing when pgoom was not started by systemd (or a
    tool speaking its protocol). Never raises: notification must not stop protection."""

    def __init__(self, environ: Optional[dict[str, str]] = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = socket_address(raw) if raw else None
        if raw and self.address is None:
            logger.warning("NOTIFY_SOCKET={!r} is not a unix socket path: not notifying", raw)
        self._sock: Optional[socket.socket] = None
        self._warned = False
        self.protected = 0
        self.source = ""

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: Any) -> bool:
        """send(READY=1, STATUS="...") → one datagram. False if it could not be sent."""
        if self.address is None:
            return False
        lines = []
        for key, value in fields.items():
            # A newline inside a value would start a new assignment: keep STATUS on one line.
            text = str(value).replace("\n", " ")
            lines.append(f"{key}={text}")
        payload = ("\n".join(lines) + "\n").encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self.address)
        except OSError as err:
            # Once at warning: a gone manager must not flood the log on every STATUS.
            log = logger.debug if self._warned else logger.warning
            self._warned = True
            log("cannot notify systemd at {}: {}", self.address.lstrip("\0"), err)
            return False
        return True

    def status_line(self) -> str:
        return f"watching with source {self.source}; {self.protected} postmaster(s) protected"

    def __call__(self, notice: Notice) -> None:
        """An Engine listener (watcher.events)."""
        if isinstance(notice, Ready):
            self.source = notice.source
            self.protected = notice.protected
            self.send(READY=1, STATUS=self.status_line(), MAINPID=os.getpid())
        elif isinstance(notice, (Adjusted, Exited)):
            self.protected = notice.protected
            self.send(STATUS=self.status_line())
        elif isinstance(notice, Failed):
            self.protected = notice.protected
            self.send(
                STATUS=f"{self.status_line()}; cannot protect pid {notice.pid}: {notice.reason}"
            )

    def stopping(self) -> None:
        self.send(STOPPING=1, STATUS="stopping")

    def failed(self, message: str) -> None:
        self.send(STATUS=f"failed: {message}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
