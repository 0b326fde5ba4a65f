"""`pgoom watch --metrics-address`: scraped over loopback from a real watcher protecting a
real PostgreSQL, parsed with prometheus_client's own exposition parser."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.pg import Cluster, read_score, wait_for
from tests.support.watcher import PGOOM, Watcher

pytestmark = pytest.mark.root

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), float("nan"))


def metrics_port(watcher: Watcher) -> int:
    text = watcher.wait_for_log("/metrics")
    found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", text)
    assert found, text
    return int(found.group(1))


def only(cluster: Cluster) -> str:
    return f"postgres -D {re.escape(cluster.data_dir)}( |$)"


@pytest.fixture
def two_clusters(make_cluster: Callable[..., Cluster]) -> tuple[Cluster, Cluster]:
    # Not under /pgdata/pg: no other watcher's default pattern on this host matches them.
    tag = uuid.uuid4().hex[:8]
    return make_cluster(name=f"metrics-a-{tag}"), make_cluster(name=f"metrics-b-{tag}")


@pytest.fixture
def watcher(tmp_path: Any, two_clusters: tuple[Cluster, Cluster]) -> Iterator[Watcher]:
    protected, refused = two_clusters
    # Two rules from a config file: one the kernel allows (0), one it refuses here (-900,
    # no CAP_SYS_RESOURCE): adjustments and failures both show.
    config = tmp_path / "pgoom.toml"
    # fallback = false: with no rule matching yet, the fallback would protect any
    # other postmaster on the host and make the counts depend on what else runs here.
    config.write_text(
        "fallback = false\n\n"
        f"[[rule]]\npattern = '{only(protected)}'\nscore = 0\n\n"
        f"[[rule]]\npattern = '{only(refused)}'\nscore = -900\n"
    )
    w = Watcher(
        "--config",
        str(config),
        "--source",
        "netlink",
        "--metrics-address",
        "127.0.0.1:0",
        # The storm below must overflow the socket: a tiny buffer instead of 32 MiB.
        "--rcvbuf",
        "4096",
    )
    try:
        w.wait_ready()
        yield w
    finally:
        w.stop()


def test_metrics_follow_the_engine(watcher: Watcher, two_clusters: tuple[Cluster, Cluster]) -> None:
    protected, refused = two_clusters
    port = metrics_port(watcher)
    before = scrape(port)
    assert value(before, "pgoom_ready") == 1
    assert value(before, "pgoom_source_active", source="netlink") == 1
    assert value(before, "pgoom_source_active", source="poll") == 0
    assert value(before, "pgoom_protected_postmasters", score_ok="true") == 0
    assert value(before, "pgoom_adjustments_total", kind="protect") == 0

    pid = protected.start()
    wait_for(lambda: read_score(pid) == 0, 10, what="postmaster protected")
    refused_pid = refused.start()
    watcher.wait_for_log(f"cannot lower oom_score_adj of pid {refused_pid}")

    after = scrape(port)
    assert value(after, "pgoom_adjustments_total", kind="protect") == 1
    assert value(after, "pgoom_failures_total", reason="denied") == 1
    assert value(after, "pgoom_protected_postmasters", score_ok="true") == 1
    assert value(after, "pgoom_protected_postmasters", score_ok="false") == 1
    # This host's memory controller is cgroup v1: no group kill, nothing to survive.
    assert value(after, "pgoom_group_kill_policy", policy="auto") == 1
    assert value(after, "pgoom_group_kill_policy", policy="keep") == 0
    assert (
        value(after, "pgoom_protected_postmasters_group_kill", group_kill="no", survives="yes") == 2
    )
    assert value(after, "pgoom_children_off_minus_1000_total") == 0
    assert value(after, "pgoom_events_received_total") > value(
        before, "pgoom_events_received_total"
    )
    # netlink events carry the exec's timestamp: one latency observed, and it is plausible.
    assert value(after, "pgoom_protect_latency_seconds_count", source="netlink") == 1
    latency_s = value(after, "pgoom_protect_latency_seconds_sum", source="netlink")
    assert 0 < latency_s < 1
    assert value(after, "pgoom_protect_latency_seconds_bucket", source="netlink", le="1.0") == 1


def test_lost_events_and_rescans_are_counted(watcher: Watcher) -> None:
    port = metrics_port(watcher)
    assert value(scrape(port), "pgoom_lost_events_total") == 0
    # Thousands of execs against an 8 KiB socket buffer while the watcher is stopped, as a
    # watcher starved of CPU would be: the kernel drops events (ENOBUFS) on any machine.
    storm = "i=0; while [ $i -lt 4000 ]; do /bin/true; i=$((i+1)); done"
    os.kill(watcher.proc.pid, signal.SIGSTOP)
    try:
        subprocess.run(["sh", "-c", storm], check=True, timeout=60)
    finally:
        os.kill(watcher.proc.pid, signal.SIGCONT)
    wait_for(lambda: value(scrape(port), "pgoom_lost_events_total") > 0, 30, what="ENOBUFS counted")
    samples = scrape(port)
    rescans = sum(v for (name, _), v in samples.items() if name == "pgoom_rescans_total")
    assert rescans >= 1
    assert value(samples, "pgoom_source_stat", source="netlink", stat="enobufs") >= 1


def test_a_bad_or_busy_address_is_exit_2() -> None:
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        for address, message in [
            ("localhost", "must be HOST:PORT"),
            (f"127.0.0.1:{port}", "cannot listen"),
        ]:
            done = subprocess.run(
                [*PGOOM, "watch", "--config", "", "--log-file", "", "--metrics-address", address],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 2, done.stderr
            # One line, before anything else happens (no subscription, no scan).
            assert done.stderr.startswith("pgoom: --metrics-address "), done.stderr
            assert message in done.stderr
            assert done.stderr.count("\n") == 1
    finally:
        busy.close()
