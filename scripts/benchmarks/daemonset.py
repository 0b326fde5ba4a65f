#!/usr/bin/env python3
"""Size the node-wide DaemonSet: pgoom's CPU per exec event and its event loss under the
DaemonSet's CPU limit, at fixed exec rates.

Run as root from the repository (PostgreSQL from scripts/setup.sh, for the postmaster
started mid-load; take the shared lock):

    flock /var/lock/pgoom-itest.lock .venv/bin/python scripts/benchmarks/daemonset.py
    ... --rates 1000 5000 --duration 20 --cpu-limit-m 50 --cpu-limit-m 0

For each CPU limit (millicores; 0 = no limit) and each rate:
- a real `pgoom watch --source netlink --children-score 0` as the DaemonSet runs it (kernel
  filter exec+fork, as --children-score needs; --exec-only for exec alone), 32 MiB buffer,
  its own pattern, is moved, once ready, into a cgroup v1 `cpu` group with
  cpu.cfs_quota_us = limit x 100 us per 100 ms period: what kubelet writes for
  `limits.cpu` (on v2 it is cpu.max with the same numbers);
- a static C generator (several processes, paced) posix_spawn()s itself at the rate; each
  child lives --lifetime-us (20 ms by default) and exits;
- an unlimited reference subscriber (the same reader and filter, 256 MiB buffer) counts
  every event the kernel sent during the window;
- halfway through, a real postmaster is started; its exec -> protected latency is read from
  the watcher's own log line (latency_us), which shows what a backlog costs;
- figures: the watcher's CPU (schedstat of all its threads) per event received and per
  spawn, its CPU share, events lost (reference count - received, and ENOBUFS), how long it
  took after the load ended to work off its queue, the CFS throttled time, and the
  postmaster's latency.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from tests.support.pg import Cluster, Template, wait_for  # noqa: E402
from tests.support.watcher import Watcher  # noqa: E402

CPU_ROOT = "/sys/fs/cgroup/cpu"
PERIOD_US = 100_000
SCORE = "13"  # a target no other watcher on a shared host uses
PROTECTED_RE = re.compile(r"protected postmaster pid=(\d+) .*latency_us=(\d+|-)")

# One generator process: spawn itself `rate` times a second for `seconds`, paced against the
# clock (catch-up allowed, so a slow start does not lower the total), print the count. Each
# child lives `lifetime_us` and exits: a process that is gone before pgoom reads its
# cmdline costs pgoom less than one still running, and real execs (a shell, a compiler)
# live a while.
GENERATOR_C = r"""
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
extern char **environ;
static double now(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}
static void pause_us(long us) {
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}
int main(int argc, char **argv) {
    if (argc == 2) { pause_us(atol(argv[1])); return 0; }  /* the exec'd child */
    double rate = atof(argv[1]), seconds = atof(argv[2]);
    char *args[] = {"gen-child", argv[3], NULL};
    long done = 0, running = 0;
    double t0 = now();
    for (;;) {
        while (running > 0 && waitpid(-1, NULL, WNOHANG) > 0) running--;
        double elapsed = now() - t0;
        if (elapsed >= seconds) break;
        if (done >= (long)(elapsed * rate)) { pause_us(200); continue; }
        pid_t pid;
        if (posix_spawn(&pid, argv[0], NULL, NULL, args, environ) == 0) { done++; running++; }
    }
    while (running > 0 && waitpid(-1, NULL, 0) > 0) running--;
    printf("%ld %.3f\n", done, now() - t0);
    return 0;
}
"""

# The reference subscriber: pgoom's own reader, unlimited, with a huge buffer; counts exec
# events until SIGTERM and prints the count and its ENOBUFS.
REFERENCE = r"""
import json, os, select, signal, sys
sys.path.insert(0, sys.argv[1])
from loguru import logger
logger.remove()
import watcher.sources.netlink as nl
forks = sys.argv[3] == "forks"
source = nl.NetlinkSource(rcvbuf_bytes=256 << 20, ack_timeout_s=1.0, want_forks=forks)
source.open()
stop = False
def on_term(_s, _f):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
open(sys.argv[2] + ".ready", "w").close()
fd = source.fileno()
count = 0
while not stop:
    try:
        ready, _, _ = select.select([fd], [], [], 0.2)
    except InterruptedError:
        continue
    if ready:
        count += len(source.read())
stats = source.stats()
source.close()
json.dump({"events": count, "enobufs": stats.get("enobufs", 0)}, open(sys.argv[2], "w"))
"""


def build_generator(workdir: str) -> str:
    source = os.path.join(workdir, "gen.c")
    binary = os.path.join(workdir, "gen")
    with open(source, "w") as f:
        f.write(GENERATOR_C)
    # Static: an exec of it costs the kernel's exec and little else, so two CPUs reach
    # thousands a second and the CPU left is pgoom's to use.
    subprocess.run(["cc", "-O2", "-static", "-o", binary, source], check=True)
    return binary


def cpu_s(pid: int) -> float:
    """CPU seconds on all of the process's threads, from schedstat (ns, not 10 ms ticks)."""
    total_ns = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total_ns += int(f.read().split()[0])
    return total_ns / 1e9


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


def received(port: int) -> float:
    return scrape(port).get("pgoom_events_received_total", float("nan"))


def lost(port: int) -> float:
    return scrape(port).get("pgoom_lost_events_total", float("nan"))


@contextlib.contextmanager
def cpu_group(limit_m: int) -> Iterator[Optional[str]]:
    """A cgroup v1 cpu group with the quota kubelet would write for `limit_m` millicores;
    None for no limit."""
    if limit_m <= 0:
        yield None
        return
    path = os.path.join(CPU_ROOT, f"pgoom-bench-{os.getpid()}")
    os.mkdir(path)
    try:
        with open(os.path.join(path, "cpu.cfs_period_us"), "w") as f:
            f.write(str(PERIOD_US))
        with open(os.path.join(path, "cpu.cfs_quota_us"), "w") as f:
            f.write(str(limit_m * PERIOD_US // 1000))
        yield path
    finally:
        # Move whatever is left back to the root before removing the group.
        with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.procs")) as f:
            for pid in f.read().split():
                with (
                    contextlib.suppress(OSError),
                    open(os.path.join(CPU_ROOT, "cgroup.procs"), "w") as root,
                ):
                    root.write(pid)
        wait_for(lambda: _rmdir(path), 10, 0.05, what=f"rmdir {path}")


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
        return True
    except OSError:
        return False


def throttled(group: Optional[str]) -> dict[str, int]:
    if group is None:
        return {}
    with open(os.path.join(group, "cpu.stat")) as f:
        return {k: int(v) for k, v in (line.split() for line in f if line.strip())}


def start_reference(workdir: str, forks: bool) -> tuple[subprocess.Popen[bytes], str]:
    """The same subscription as the watcher's (exec, or exec+fork), unlimited."""
    out = os.path.join(workdir, f"ref-{time.monotonic_ns()}.json")
    argv = [sys.executable, "-c", REFERENCE, ROOT, out, "forks" if forks else "exec"]
    proc = subprocess.Popen(argv)
    wait_for(lambda: os.path.exists(out + ".ready"), 30, 0.02, what="reference subscriber")
    return proc, out


def stop_reference(proc: subprocess.Popen[bytes], out: str) -> dict[str, Any]:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    with open(out) as f:
        result: dict[str, Any] = json.load(f)
    return result


def drain(pid: int, timeout_s: float) -> float:
    """Seconds until the watcher has worked off its queue: its CPU stops moving (under
    1 ms in 0.5 s). Not by scraping its metrics: under a 50m quota every scrape would
    take a good part of the quota itself."""
    t0 = time.monotonic()
    last = cpu_s(pid)
    still_since = t0
    while time.monotonic() - t0 < timeout_s:
        time.sleep(0.05)
        now = cpu_s(pid)
        if now - last > 0.001:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= 0.5:
            return still_since - t0
    return float("nan")


def run_one(
    template: Template,
    generator: str,
    workdir: str,
    rate: int,
    duration_s: float,
    limit_m: int,
    processes: int,
    realtime: bool,
    children_score: Optional[int],
    lifetime_us: int,
) -> dict[str, Any]:
    cluster = Cluster(template)
    pattern = re.escape(f"postgres -D {cluster.data_dir}") + "(?: |$)"
    args = [
        "--source",
        "netlink",
        "--score",
        SCORE,
        "--pattern",
        pattern,
        "--data-dir",
        cluster.data_dir,
        "--metrics-address",
        "127.0.0.1:0",
    ]
    if children_score is not None:
        # What the shipped DaemonSet runs: fork events too (children of protected
        # postmasters), so the kernel delivers a fork and an exec per spawn.
        args += ["--children-score", str(children_score)]
    if realtime:
        args.append("--realtime")
    watcher = Watcher(*args)
    try:
        watcher.wait_ready(60)
        port_match = wait_for(
            lambda: re.search(r"metrics on http://127\.0\.0\.1:(\d+)", watcher.text()),
            10,
            0.05,
            what="metrics address in the log",
        )
        assert isinstance(port_match, re.Match)
        port = int(port_match[1])
        with cpu_group(limit_m) as group:
            if group is not None:
                # Every thread of the watcher (the metrics server's too), as kubelet would.
                with open(os.path.join(group, "cgroup.procs"), "w") as f:
                    f.write(str(watcher.proc.pid))
            before_throttle = throttled(group)
            ref, ref_out = start_reference(workdir, children_score is not None)
            got0, lost0, cpu0 = received(port), lost(port), cpu_s(watcher.proc.pid)
            t0 = time.monotonic()
            gens = [
                subprocess.Popen(
                    [generator, str(rate / processes), str(duration_s), str(lifetime_us)],
                    stdout=subprocess.PIPE,
                )
                for _ in range(processes)
            ]
            time.sleep(duration_s / 2)
            postmaster = cluster.start(wait=False)
            spawned = 0
            for gen in gens:
                out, _ = gen.communicate(timeout=duration_s * 4 + 30)
                spawned += int(out.split()[0])
            load_s = time.monotonic() - t0
            drain_s = drain(watcher.proc.pid, 120)
            reference = stop_reference(ref, ref_out)
            got, lost_n, cpu = (
                received(port) - got0,
                lost(port) - lost0,
                cpu_s(watcher.proc.pid) - cpu0,
            )
            after_throttle = throttled(group)
            logged = {int(m[1]): m[2] for m in PROTECTED_RE.finditer(watcher.text())}
            latency = logged.get(postmaster)
        with contextlib.suppress(Exception):
            cluster.wait_ready()
        cluster.stop()
    finally:
        watcher.stop()
        cluster.destroy()
    throttled_s = (
        (after_throttle.get("throttled_time", 0) - before_throttle.get("throttled_time", 0)) / 1e9
        if group is not None
        else 0.0
    )
    return {
        "rate": rate,
        "limit_m": limit_m,
        "realtime": realtime,
        "fork_events": children_score is not None,
        "lifetime_us": lifetime_us,
        "spawned": spawned,
        "achieved_per_s": spawned / load_s,
        "reference_events": reference["events"],
        "reference_enobufs": reference["enobufs"],
        "received": got,
        # The two counters start and stop a few ms apart on a host where others exec too.
        "lost": max(0, int(reference["events"] - got)),
        "enobufs": lost_n,
        "cpu_s": cpu,
        "cpu_us_per_event": cpu / got * 1e6 if got else float("nan"),
        "cpu_us_per_spawn": cpu / spawned * 1e6 if spawned else float("nan"),
        "cpu_share_m": cpu / (load_s + (0 if math.isnan(drain_s) else drain_s)) * 1000,
        "drain_s": drain_s,
        "throttled_s": throttled_s,
        "postmaster_latency_us": None if latency is None or latency == "-" else int(latency),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per run")
    parser.add_argument(
        "--cpu-limit-m", type=int, action="append", help="millicores (0: none); repeatable"
    )
    parser.add_argument("--processes", type=int, default=3, help="generator processes")
    parser.add_argument("--realtime", action="store_true", help="run the watcher --realtime")
    parser.add_argument(
        "--children-score",
        type=int,
        default=0,
        help="as the DaemonSet (exec+fork events); --exec-only for exec events alone",
    )
    parser.add_argument(
        "--lifetime-us", type=int, default=20000, help="how long each exec'd child lives"
    )
    parser.add_argument("--exec-only", dest="children_score", action="store_const", const=None)
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_daemonset: run as root (netlink filter, cpu cgroup, PostgreSQL user)")
    limits = opts.cpu_limit_m or [50]
    with open("/proc/loadavg") as f:
        print(f"load average at start: {f.read().split()[0]} on {os.cpu_count()} CPUs", flush=True)
    workdir = tempfile.mkdtemp(prefix="pgoom-bench-ds-")
    rows = []
    try:
        generator = build_generator(workdir)
        template = Template()
        try:
            for limit in limits:
                for rate in opts.rates:
                    row = run_one(
                        template,
                        generator,
                        workdir,
                        rate,
                        opts.duration,
                        limit,
                        opts.processes,
                        opts.realtime,
                        opts.children_score,
                        opts.lifetime_us,
                    )
                    rows.append(row)
                    events = "exec+fork" if row["fork_events"] else "exec only"
                    print(
                        f"{events}, limit {limit or 'none'}m rate {rate}/s (achieved "
                        f"{row['achieved_per_s']:.0f}/s): {row['cpu_us_per_event']:.1f} us CPU "
                        f"per event received ({row['cpu_us_per_spawn']:.1f} per spawn), "
                        f"{row['cpu_share_m']:.0f}m used, lost {row['lost']} of "
                        f"{row['reference_events']} (ENOBUFS {row['enobufs']:.0f}), drained "
                        f"{row['drain_s']:.1f} s after the load, throttled "
                        f"{row['throttled_s']:.1f} s, postmaster mid-load protected after "
                        f"{row['postmaster_latency_us']} us",
                        flush=True,
                    )
        finally:
            template.cleanup()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if opts.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
