#!/usr/bin/env python3
"""Benchmarks of the netlink source, with the poll source as the baseline, in one run.

Run as root from the repository (PostgreSQL from scripts/setup.sh):

    .venv/bin/python scripts/benchmarks/netlink.py            # everything, ~3-4 minutes
    .venv/bin/python scripts/benchmarks/netlink.py --only cpu  # latency|poll|cpu|storm|idle

Parts:
- latency: real `pgoom watch --source netlink --score 0` against real postmaster starts;
  the figure is the watcher's own `latency_us` (kernel exec timestamp, CLOCK_MONOTONIC, to
  oom_score_adj written and read back), cross-checked by reading the score.
- poll: the 30 s poll of the script pgoom replaces, as the baseline: its distribution is
  computed (a start lands uniformly inside the interval) and confirmed by a
  shorter-interval run measured from the start of the postmaster to its score changing,
  scaled to 30 s.
- cpu: the same exec storm read at once by three subscribers, each in its own process:
  pyroute2's ProcEventSocket.get(), our raw reader on the same unfiltered stream, and our
  reader as pgoom runs it (exec-only kernel filter on 6.6+). CPU seconds per event.
- storm: 100k exec events with the watcher at nice 19 and the default 32 MiB buffer while
  postmasters start: how many were missed (not protected by their exec event).
- idle: voluntary context switches (wakeups) of an idle event-mode watcher, and its RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from tests.support.pg import Cluster, Template, read_score, wait_for  # noqa: E402
from tests.support.watcher import Watcher  # noqa: E402

STORM = (
    "import os, sys\n"
    "for _ in range(int(sys.argv[1])):\n"
    "    os.waitpid(os.posix_spawn('/bin/true', ['true'], {}), 0)\n"
)
POLL_BASELINE_S = 30.0
# Targets no other watcher on a shared host uses, so each adjustment is this watcher's own.
NETLINK_SCORE = "11"
POLL_SCORE = "12"
READER_KINDS = ["pyroute2", "raw-unfiltered", "raw-filtered"]
PROTECTED_RE = re.compile(r"protected postmaster pid=(\d+) .*latency_us=(\d+|-)")


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), math.ceil(p / 100 * len(ordered))))
    return ordered[rank - 1]


def summary(values: list[float], unit: str, scale: float = 1.0) -> str:
    return (
        f"p50 {pct(values, 50) * scale:.4g} {unit}, p90 {pct(values, 90) * scale:.4g} {unit}, "
        f"p99 {pct(values, 99) * scale:.4g} {unit}, max {max(values) * scale:.4g} {unit} "
        f"(n={len(values)})"
    )


def own_rules(cluster: Cluster) -> list[str]:
    pattern = re.escape(f"postgres -D {cluster.data_dir}") + "(?: |$)"
    return ["--pattern", pattern, "--data-dir", cluster.data_dir]


def latencies_from_log(text: str) -> dict[int, Optional[int]]:
    found: dict[int, Optional[int]] = {}
    for match in PROTECTED_RE.finditer(text):
        found[int(match[1])] = None if match[2] == "-" else int(match[2])
    return found


def start_and_protect(
    cluster: Cluster, watcher: Watcher, timeout_s: float = 10.0
) -> tuple[int, float]:
    """Start the postmaster; return its PID and the seconds until `watcher` logged that it
    protected it (NaN if it did not). The log, not the score, is the signal: other watchers
    on a shared host may write the score too."""
    t0 = time.monotonic()
    pm = cluster.start(wait=False)
    needle = f"protected postmaster pid={pm} "
    deadline = t0 + timeout_s
    while time.monotonic() < deadline:
        if needle in watcher.text():
            return pm, time.monotonic() - t0
        time.sleep(0.002)
    return pm, float("nan")


def stop(cluster: Cluster) -> None:
    """Stop cleanly: wait until it accepts connections (its pid file is complete), then an
    immediate shutdown, so that the next start finds no leftovers."""
    with contextlib.suppress(Exception):
        cluster.wait_ready()
    cluster.stop()


@contextlib.contextmanager
def watching(*args: str, prefix: Optional[list[str]] = None) -> Iterator[Watcher]:
    watcher = Watcher(*args, prefix=prefix)
    try:
        watcher.wait_ready(30)
        yield watcher
    finally:
        watcher.stop()


def storm(execs: int, processes: int = 3) -> list[subprocess.Popen[bytes]]:
    share = execs // processes
    return [subprocess.Popen([sys.executable, "-c", STORM, str(share)]) for _ in range(processes)]


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_field(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise KeyError(name)


# --- parts -----------------------------------------------------------------------------


def bench_latency(template: Template, starts: int, nice: str = "0") -> dict[str, Any]:
    """`nice`: a nice value, or "fifo" to run the watcher SCHED_FIFO (chrt -f 1): on a host
    shared with other loads this separates pgoom's own path from waiting for a CPU."""
    cluster = Cluster(template)
    seen: list[float] = []
    missing = 0
    read_back = 0
    try:
        with watching(
            "--source",
            "netlink",
            "--score",
            NETLINK_SCORE,
            *own_rules(cluster),
            prefix=["chrt", "-f", "1"] if nice == "fifo" else ["nice", "-n", nice],
        ) as watcher:
            pids = []
            for _ in range(starts):
                pm, observed_s = start_and_protect(cluster, watcher)
                pids.append(pm)
                with contextlib.suppress(OSError):
                    read_back += read_score(pm) == int(NETLINK_SCORE)
                if math.isnan(observed_s):  # not protected in time
                    missing += 1
                stop(cluster)
            wait_for(lambda: len(latencies_from_log(watcher.text())) >= starts - missing, 10)
            logged = latencies_from_log(watcher.text())
            seen = [float(v) for p in pids if (v := logged.get(p)) is not None]
    finally:
        cluster.destroy()
    print(
        f"netlink exec -> protected (watcher's latency_us), watcher at "
        f"{'SCHED_FIFO' if nice == 'fifo' else 'nice ' + nice}: "
        f"{summary(seen, 'us')}"
    )
    print(f"  postmasters not protected within 10 s: {missing} of {starts}")
    print(f"  score read back at the target right after: {read_back} of {starts}")
    return {"latency_us": seen, "missing": missing}


def bench_poll(template: Template, starts: int, interval_s: float) -> dict[str, Any]:
    cluster = Cluster(template)
    ratios: list[float] = []
    try:
        with watching(
            "--source",
            "poll",
            "--interval",
            f"{interval_s:g}",
            "--score",
            POLL_SCORE,
            *own_rules(cluster),
        ) as watcher:
            for _ in range(starts):
                time.sleep(random.uniform(0, interval_s))  # a random phase in the interval
                _pm, observed_s = start_and_protect(cluster, watcher, interval_s * 3)
                if not math.isnan(observed_s):
                    ratios.append(observed_s / interval_s)
                stop(cluster)
    finally:
        cluster.destroy()
    print(
        f"poll every {POLL_BASELINE_S:g} s, computed: start uniform in the interval -> "
        f"p50 {0.5 * POLL_BASELINE_S:g} s, p90 {0.9 * POLL_BASELINE_S:g} s, "
        f"p99 {0.99 * POLL_BASELINE_S:g} s"
    )
    print(
        f"poll every {interval_s:g} s, measured (start -> score read back), as a fraction of "
        f"the interval: {summary(ratios, '')}"
    )
    print(f"  scaled to {POLL_BASELINE_S:g} s: {summary(ratios, 's', POLL_BASELINE_S)}")
    return {"ratios": ratios}


def reader_main(kind: str, out_path: str) -> None:
    """Child process: subscribe, then count events until SIGTERM; report CPU and counts."""

    class Stop(Exception):
        pass

    def on_term(_signum: int, _frame: object) -> None:
        raise Stop

    from loguru import logger

    logger.remove()  # the readers print nothing but their figures
    count = 0
    errors = 0
    sock_dup: Optional[socket.socket] = None
    if kind == "pyroute2":
        from pyroute2.netlink.connector.cn_proc import ProcEventSocket

        from watcher.sources.netlink import (
            PROC_CN_MCAST_IGNORE,
            SO_RCVBUFFORCE,
            _control_message,
        )

        pr2 = ProcEventSocket()
        pr2.bind()
        sock_dup = socket.socket(fileno=os.dup(pr2.fileno()))
        sock_dup.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 << 20)
        pr2.control(listen=True)
        signal.signal(signal.SIGTERM, on_term)
        open(out_path + ".ready", "w").close()
        start = resource.getrusage(resource.RUSAGE_SELF)
        try:
            while True:
                try:
                    count += len(pr2.get())
                except OSError:
                    errors += 1
                    if errors > 1000:
                        break
        except Stop:
            pass
        end = resource.getrusage(resource.RUSAGE_SELF)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sock_dup.send(_control_message(PROC_CN_MCAST_IGNORE, 0))
        sock_dup.close()
    else:
        import select

        import watcher.sources.netlink as nl

        if kind == "raw-unfiltered":
            nl.kernel_filters_events = lambda release: False  # the same stream as pyroute2
        source = nl.NetlinkSource(rcvbuf_bytes=256 << 20, ack_timeout_s=1.0)
        source.open()
        fd = source.fileno()
        signal.signal(signal.SIGTERM, on_term)
        open(out_path + ".ready", "w").close()
        start = resource.getrusage(resource.RUSAGE_SELF)
        try:
            while True:
                select.select([fd], [], [])
                source.read()
        except Stop:
            pass
        end = resource.getrusage(resource.RUSAGE_SELF)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stats = source.stats()
        count = stats["datagrams"]
        errors = stats["enobufs"]
        source.close()
    user_s = end.ru_utime - start.ru_utime
    sys_s = end.ru_stime - start.ru_stime
    wakeups = end.ru_nvcsw - start.ru_nvcsw
    with open(out_path, "w") as f:
        json.dump(
            {
                "kind": kind,
                "events": count,
                "cpu_s": user_s + sys_s,
                "user_s": user_s,
                "sys_s": sys_s,
                "wakeups": wakeups,
                "errors": errors,
            },
            f,
        )
    # pyroute2's asyncio queue, interrupted mid-get(), complains at interpreter shutdown.
    os._exit(0)


def run_readers(execs: int, backlog: bool) -> dict[str, dict[str, Any]]:
    """Three subscribers, one storm. live: they read as events arrive (the real case, where
    a fast reader wakes for every few events); backlog: they are stopped during the storm and
    then drain their queues (the per-event cost of the read path alone)."""
    readers = {}
    outs = {}
    for kind in READER_KINDS:
        outs[kind] = f"/tmp/pgoom-bench-reader-{kind}-{os.getpid()}.json"
        readers[kind] = subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--reader",
                kind,
                "--reader-out",
                outs[kind],
            ],
            cwd=ROOT,
        )
    for kind in READER_KINDS:  # subscribed (a loaded host can take seconds to start them)
        ready = outs[kind] + ".ready"
        wait_for(lambda: os.path.exists(ready), 120, 0.05, what=kind)  # noqa: B023
        os.unlink(outs[kind] + ".ready")
    if backlog:
        for proc in readers.values():
            proc.send_signal(signal.SIGSTOP)
    for proc in storm(execs):
        proc.wait()

    def idle(pids: list[int]) -> bool:
        before = {pid: cpu_s(pid) for pid in pids}
        time.sleep(1.0)
        return all(cpu_s(pid) - before[pid] < 0.02 for pid in pids)

    # Backlog: one reader at a time drains its queue, so that no reader's idle time waiting
    # for the others is spent waking up for the host's background events.
    groups = [[k] for k in READER_KINDS] if backlog else [list(READER_KINDS)]
    results = {}
    for group in groups:
        if backlog:
            readers[group[0]].send_signal(signal.SIGCONT)
        pids_of_group = [readers[k].pid for k in group]
        wait_for(lambda: idle(pids_of_group), 600, 0, what="drained")  # noqa: B023
        for kind in group:
            readers[kind].send_signal(signal.SIGTERM)
            readers[kind].wait(timeout=30)
            with open(outs[kind]) as f:
                results[kind] = json.load(f)
            os.unlink(outs[kind])
    per = {k: r["cpu_s"] / max(1, r["events"]) for k, r in results.items()}
    mode = "backlog (readers stopped during the storm, then drained)" if backlog else "live"
    print(f"CPU per event, {mode}, one storm of {execs} execs:")
    for kind in READER_KINDS:
        r = results[kind]
        print(
            f"  {kind:15s} {r['events']:7d} events  {r['cpu_s']:6.2f} CPU s "
            f"(user {r['user_s']:.2f} + sys {r['sys_s']:.2f})  {per[kind] * 1e6:6.1f} us/event  "
            f"{r['wakeups']} wakeups  errors {r['errors']}"
        )
    ratio = per["pyroute2"] / per["raw-unfiltered"]
    storm_ratio = results["pyroute2"]["cpu_s"] / max(1e-9, results["raw-filtered"]["cpu_s"])
    print(f"  pyroute2 get() / raw reader, per event of the same stream: {ratio:.1f}x")
    print(
        "  pyroute2 get() / pgoom's reader (exec-only kernel filter), CPU for the whole storm: "
        f"{storm_ratio:.1f}x"
    )
    return {"results": results, "ratio": ratio, "storm_ratio": storm_ratio}


def bench_cpu(execs: int) -> dict[str, Any]:
    return {"live": run_readers(execs, False), "backlog": run_readers(execs, True)}


def bench_storm(template: Template, execs: int, postmasters: int) -> dict[str, Any]:
    cluster = Cluster(template)
    pids: list[int] = []
    missed = 0
    try:
        with watching(
            "--source",
            "netlink",
            "--score",
            NETLINK_SCORE,
            *own_rules(cluster),
            prefix=["nice", "-n", "19"],
        ) as watcher:
            nice = int(open(f"/proc/{watcher.proc.pid}/stat").read().rsplit(")", 1)[1].split()[16])
            procs = storm(execs)
            gap_s = 2.0
            for _ in range(postmasters):
                if all(p.poll() is not None for p in procs):
                    break
                time.sleep(gap_s)
                pm, _observed_s = start_and_protect(cluster, watcher, 10)
                pids.append(pm)
                stop(cluster)
            t_storm = time.monotonic()
            for p in procs:
                p.wait()
            log = watcher.text()
            logged = latencies_from_log(log)
            missed = sum(1 for p in pids if logged.get(p) is None)
            enobufs = log.count("ENOBUFS")
            latency = [float(v) for p in pids if (v := logged.get(p)) is not None]
    finally:
        cluster.destroy()
    del t_storm
    print(
        f"storm of {execs} execs, watcher at nice {nice}, 32 MiB buffer: {len(pids)} postmasters "
        f"started during it, {missed} missed (not protected by their exec event), "
        f"ENOBUFS warnings {enobufs}"
    )
    if latency:
        print(f"  exec -> protected under the storm: {summary(latency, 'us')}")
    return {"postmasters": len(pids), "missed": missed, "enobufs": enobufs, "latency": latency}


def bench_idle(idle_s: float) -> dict[str, Any]:
    from watcher.sources.netlink import NetlinkSource

    # Nothing to protect (a data-dir rule for a directory that does not exist also keeps the
    # fallbacks from adopting other postmasters on the host): no verify timer either.
    nothing = ["--pattern", "^no-such-postmaster$", "--data-dir", "/nonexistent/pgoom-bench-idle"]
    with watching("--source", "netlink", "--score", "0", *nothing) as w:
        time.sleep(1.0)  # settle after start-up
        counter = NetlinkSource(rcvbuf_bytes=32 << 20, ack_timeout_s=1.0)
        counter.open()  # exec-only, like the watcher: what could legitimately wake it
        pid = w.proc.pid
        v0 = status_field(pid, "voluntary_ctxt_switches")
        n0 = status_field(pid, "nonvoluntary_ctxt_switches")
        blocked = sample_blocking_syscalls(pid, idle_s)
        v1 = status_field(pid, "voluntary_ctxt_switches")
        n1 = status_field(pid, "nonvoluntary_ctxt_switches")
        counter.read()
        host_execs = counter.stats()["datagrams"]
        counter.close()
        rss_kb = status_field(pid, "VmRSS")
        hwm_kb = status_field(pid, "VmHWM")
    wakeups = v1 - v0
    print(
        f"idle {idle_s:g} s, event mode (netlink): {wakeups} voluntary wakeups "
        f"({wakeups / idle_s:.2f}/s), {n1 - n0} involuntary; exec events on the host in the "
        f"window: {host_execs} (each may wake the watcher once)"
    )
    print(
        "  where it sleeps (sampled /proc/<pid>/syscall once a second): "
        + ", ".join(f"{what} x{n}" for what, n in sorted(blocked.items()))
    )
    print(f"  RSS {rss_kb / 1024:.1f} MiB (VmRSS), peak {hwm_kb / 1024:.1f} MiB (VmHWM)")
    rss_breakdown()
    return {"wakeups": wakeups, "host_execs": host_execs, "rss_kb": rss_kb, "hwm_kb": hwm_kb}


# x86_64 syscall numbers of the waits an event loop may sleep in, and the index of their
# timeout argument in /proc/<pid>/syscall (after the number).
WAITS = {
    "232": ("epoll_wait", 4),
    "281": ("epoll_pwait", 4),
    "441": ("epoll_pwait2", 4),
    "7": ("poll", 3),
    "271": ("ppoll", 3),
    "23": ("select", 5),
    "270": ("pselect6", 5),
}


def sample_blocking_syscalls(pid: int, duration_s: float) -> dict[str, int]:
    """What the process is blocked in, once a second: a wait with timeout -1 (no timer) is
    the proof that no polling loop hides in event mode."""
    seen: dict[str, int] = {}
    end = time.monotonic() + duration_s
    while time.monotonic() < end:
        time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
        name, arg = WAITS.get(fields[0], (f"syscall {fields[0]}", 0))
        if arg:
            raw = int(fields[arg], 16) & 0xFFFFFFFF
            timeout = raw - (1 << 32) if raw >= 1 << 31 else raw
            name += " (no timeout)" if timeout == -1 else f" (timeout arg {fields[arg]})"
        seen[name] = seen.get(name, 0) + 1
    return seen


def rss_breakdown() -> None:
    """What each import adds to a fresh interpreter's RSS, in the order pgoom loads them."""
    code = (
        "import importlib, sys\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS:'): return int(line.split()[1])\n"
        "last = rss(); print('python', last)\n"
        "for name in sys.argv[1:]:\n"
        "    importlib.import_module(name); now = rss(); print(name, now - last); last = now\n"
        "from watcher.sources.netlink import _pyroute2_connector\n"
        "_pyroute2_connector(); print('pyroute2-connector', rss() - last); last = rss()\n"
        "import pyroute2.iproute; print('pyroute2-rest-of-package-if-imported', rss() - last)\n"
    )
    mods = [
        "loguru",
        "psutil",
        "typer",
        "watcher.cli",
        "watcher.engine",
        "watcher.commands.watch",
        "watcher.sources.netlink",
    ]
    out = subprocess.run(
        [sys.executable, "-c", code, *mods], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split("\n")
    parts = [line.rsplit(" ", 1) for line in out if line.strip()]
    print("  RSS by import (KiB added): " + ", ".join(f"{n} {int(v)}" for n, v in parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["latency", "poll", "cpu", "storm", "idle"])
    parser.add_argument("--starts", type=int, default=100, help="postmaster starts (latency)")
    parser.add_argument(
        "--latency-nice",
        action="append",
        help="nice value(s) of the watcher for the latency part, or 'fifo' (default: 0)",
    )
    parser.add_argument("--poll-starts", type=int, default=20)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--cpu-execs", type=int, default=20000)
    parser.add_argument("--storm-execs", type=int, default=100000)
    parser.add_argument("--storm-postmasters", type=int, default=10)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--reader", help=argparse.SUPPRESS)
    parser.add_argument("--reader-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reader:
        reader_main(args.reader, args.reader_out)
        return
    if os.geteuid() != 0:
        sys.exit("bench_netlink: run as root (real PostgreSQL, oom_score_adj, SO_RCVBUFFORCE)")
    print(
        f"kernel {os.uname().release}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    want = {args.only} if args.only else {"latency", "poll", "cpu", "storm", "idle"}
    template = Template() if want & {"latency", "poll", "storm"} else None
    figures: dict[str, Any] = {}
    try:
        if "latency" in want:
            assert template is not None
            for nice in args.latency_nice or ["0"]:
                figures.setdefault("latency", bench_latency(template, args.starts, nice))
        if "poll" in want:
            assert template is not None
            figures["poll"] = bench_poll(template, args.poll_starts, args.poll_interval)
        if "latency" in want and "poll" in want:
            nl = figures["latency"]["latency_us"]
            poll = figures["poll"]["ratios"]
            print(
                "netlink vs poll at 30 s (measured fractions scaled): p50 "
                f"{pct(poll, 50) * POLL_BASELINE_S * 1e6 / pct(nl, 50):.3g}x faster, p99 "
                f"{pct(poll, 99) * POLL_BASELINE_S * 1e6 / pct(nl, 99):.3g}x faster"
            )
        if "cpu" in want:
            figures["cpu"] = bench_cpu(args.cpu_execs)
        if "storm" in want:
            assert template is not None
            figures["storm"] = bench_storm(template, args.storm_execs, args.storm_postmasters)
        if "idle" in want:
            figures["idle"] = bench_idle(args.idle_s)
    finally:
        if template is not None:
            template.cleanup()


if __name__ == "__main__":
    main()
