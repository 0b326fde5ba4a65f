"""Opening the proc connector where the kernel refuses the bind. The real case runs in the
VM (scripts/vm-test.sh: Linux 6.1, the systemd unit without CAP_NET_ADMIN); here only the
translation of pyroute2's way of reporting it is checked."""

from __future__ import annotations

import pytest

from watcher.errors import SourceUnavailable
from watcher.sources import netlink


def test_refused_bind_is_unavailable_not_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused() -> None:
        # What pyroute2 0.9 raises after bind() failed with EPERM on every port it tried.
        raise KeyError("no free address available")

    monkeypatch.setattr(netlink, "_open_socket", refused)
    with pytest.raises(SourceUnavailable, match="CAP_NET_ADMIN"):
        netlink.NetlinkSource(1 << 20, 0.5).open()
