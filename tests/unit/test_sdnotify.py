"""The sd_notify datagram protocol, against real AF_UNIX datagram sockets (path and
abstract)."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from watcher.events import Adjusted, Failed, Ready
from watcher.sdnotify import Notifier, socket_address


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    directory = tempfile.mkdtemp(prefix="pgoom-notify-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()
    os.unlink(path)
    os.rmdir(directory)


def parse(datagram: bytes) -> dict[str, str]:
    text = datagram.decode()
    assert text.endswith("\n")
    return dict(line.split("=", 1) for line in text.splitlines())


def test_socket_address() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@/org/freedesktop/systemd1/notify/1") == (
        "\0/org/freedesktop/systemd1/notify/1"
    )
    assert socket_address("vsock:2:1234") is None


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.send(READY=1) is False


def test_ready_and_status_reach_a_path_socket(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier(Ready(source="netlink", protected=2))
    fields = parse(sock.recv(4096))
    assert fields["READY"] == "1"
    assert fields["STATUS"] == "watching with source netlink; 2 postmaster(s) protected"
    assert fields["MAINPID"] == str(os.getpid())
    notifier(Adjusted(42, None, 1000, -900, "netlink", 1, "pattern", protected=3))
    assert parse(sock.recv(4096)) == {
        "STATUS": "watching with source netlink; 3 postmaster(s) protected"
    }
    notifier(Failed(43, 1, None, reason="denied", message="refused", protected=3))
    assert "cannot protect pid 43: denied" in parse(sock.recv(4096))["STATUS"]
    notifier.stopping()
    assert parse(sock.recv(4096)) == {"STOPPING": "1", "STATUS": "stopping"}
    notifier.close()


def test_abstract_socket() -> None:
    name = f"pgoom-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.send(STATUS="line one\nREADY=1") is True
        # A newline in a value must not smuggle in another assignment.
        assert parse(sock.recv(4096)) == {"STATUS": "line one READY=1"}
        notifier.close()
    finally:
        sock.close()


def test_a_missing_socket_is_not_fatal(tmp_path: object) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": f"/nonexistent/{uuid.uuid4().hex}"})
    assert notifier.enabled
    assert notifier.send(READY=1) is False
    assert notifier.send(STATUS="again") is False  # no exception, warned once
    notifier.close()
