"""The group-kill checks (issue 11): pgoom's --group-kill policies against the real cgroup v2
group kill, in the guest. Each check names what it proves; docs/kubernetes.md's protection
matrix cites them by name.

Real OOMs go through the harness (support.harness_run); the rest start PostgreSQL inside a
cgroup of their own with memory.oom.group as kubelet sets it, and look at what pgoom did.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

from scripts.oomharness.cgroup import detect
from scripts.oomharness.scenarios import BIG_QUERY, MANY_BACKENDS
from scripts.vm.guest.registry import Context, Failed, Figures, check, expect
from scripts.vm.guest.support import PGOOM, harness_run, pgoom, score_reaches, template
from tests.support.pg import Cluster, children_of, read_score, wait_for
from tests.support.watcher import Watcher

V2_ROOT = "/sys/fs/cgroup"


# --- a cgroup as kubelet makes one, and a cluster inside it ----------------------------------


class KubeletCgroup:
    """A v2 cgroup with memory.oom.group set, as kubelet creates one per container."""

    def __init__(self, oom_group: int = 1, parent: str = V2_ROOT) -> None:
        version, _ = detect()  # enables the memory controller at the root if needed
        if version != 2:
            raise Failed("the group-kill checks need cgroup v2")
        self.path = f"{parent}/pgoom-gk-{uuid.uuid4().hex[:8]}"
        os.mkdir(self.path)
        self.write("memory.oom.group", str(oom_group))

    def write(self, name: str, value: str) -> None:
        with open(f"{self.path}/{name}", "w") as f:
            f.write(value)

    def read(self, name: str) -> str:
        with open(f"{self.path}/{name}") as f:
            return f.read().strip()

    @property
    def kernel_path(self) -> str:
        return self.path[len(V2_ROOT) :]

    def remove(self) -> None:
        def gone() -> bool:
            try:
                os.rmdir(self.path)
                return True
            except FileNotFoundError:
                return True
            except OSError:
                return False

        wait_for(gone, 30, 0.05, what=f"rmdir {self.path}")


class CgroupCluster(Cluster):
    """A production-like cluster (launcher 0, children 0 through PG_OOM_ADJUST_VALUE) whose
    postmaster is started inside `cgroup` (a container's cgroup)."""

    def __init__(self, cgroup: KubeletCgroup, launcher_score: int = 0, **kw: object) -> None:
        self.procs_file = f"{cgroup.path}/cgroup.procs"
        super().__init__(template(), launcher_score=launcher_score, children_score=0, **kw)  # type: ignore[arg-type]

    def move_to(self, cgroup: KubeletCgroup) -> None:
        """The next start runs in another cgroup: a restarted container."""
        self.procs_file = f"{cgroup.path}/cgroup.procs"

    def _preexec(self) -> Callable[[], None]:
        then = super()._preexec()
        procs = self.procs_file

        def run_in_cgroup() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
            then()

        return run_in_cgroup


def own_rules(cluster: Cluster) -> list[str]:
    return ["--pattern", re.escape(f"postgres -D {cluster.data_dir}") + "(?: |$)"]


@contextmanager
def cluster_in(
    oom_group: int = 1, launcher_score: int = 0
) -> Iterator[tuple[CgroupCluster, KubeletCgroup]]:
    cgroup = KubeletCgroup(oom_group)
    cluster = CgroupCluster(cgroup, launcher_score=launcher_score)
    try:
        yield cluster, cgroup
    finally:
        cluster.destroy()
        cgroup.remove()


def children_scores(pm: int) -> list[int]:
    scores = []
    for child in children_of(pm):
        try:
            scores.append(read_score(child))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return scores


def _save(ctx: Context, name: str, watcher: Watcher) -> None:
    with open(ctx.log_path(name, "pgoom.log"), "w") as f:
        f.write(watcher.text())


# --- real OOMs (the harness) -----------------------------------------------------------------


def _auto_survives(ctx: Context, name: str, scenario: str) -> Figures:
    runs = 10 if ctx.mode == "full" else 1
    figures = harness_run(ctx, name, scenario, 1, -900, group_kill="auto", runs=runs)
    expect(figures["oom_kills"], "no OOM kill happened (nothing was tested)", **figures)
    expect(
        figures["postmaster_survived_runs"] == runs,
        f"the postmaster survived {figures['postmaster_survived_runs']} of {runs}",
        **figures,
    )
    expect(figures["postmaster_adj_at_oom"] == -1000, "the postmaster was not at -1000", **figures)
    expect(not figures["children_at_minus_1000"], "a child was left at -1000", **figures)
    expect(figures["rows_lost_all"] == 0, "committed rows lost", **figures)
    return figures


@check("group kill: auto, big-query: the postmaster survives, no child at -1000, rows lost 0")
def auto_big_query(ctx: Context) -> Figures:
    return _auto_survives(ctx, "gk-auto-big-query", BIG_QUERY)


@check(
    "group kill: auto, many-backends: the postmaster survives, no child at -1000, rows lost 0",
    modes=("full",),
)
def auto_many_backends(ctx: Context) -> Figures:
    return _auto_survives(ctx, "gk-auto-many-backends", MANY_BACKENDS)


@check("group kill: ungroup: memory.oom.group reads 0 afterwards, only the backend is killed")
def ungroup_big_query(ctx: Context) -> Figures:
    figures = harness_run(ctx, "gk-ungroup", BIG_QUERY, 1, -900, group_kill="ungroup")
    expect(figures["oom_kills"], "no OOM kill happened (nothing was tested)", **figures)
    expect(figures["oom_group_after"] == "0", "memory.oom.group is not 0 afterwards", **figures)
    expect(figures["postmaster_survived"], "the postmaster was killed", **figures)
    expect(figures["postmaster_adj_at_oom"] == -900, "the score was not kept at -900", **figures)
    expect(figures["victims"] == {"backend": 1} and figures["oom_kills"] == 1,
           "not only the backend was killed", **figures)  # fmt: skip
    return figures


@check("group kill: keep at -900: the postmaster dies (baseline)")
def keep_dies(ctx: Context) -> Figures:
    figures = harness_run(ctx, "gk-keep", BIG_QUERY, 1, -900, group_kill="keep")
    expect(figures["oom_kills"], "no OOM kill happened (nothing was tested)", **figures)
    expect(not figures["postmaster_survived"], "the postmaster survived a group kill", **figures)
    expect(figures["postmaster_adj_at_oom"] == -900, "the score was not -900", **figures)
    return figures


# --- the policy without an OOM ---------------------------------------------------------------


@check("group kill: a container restart: the new cgroup is read and the policy applied again")
def container_restart(ctx: Context) -> Figures:
    first = KubeletCgroup(1)
    second = KubeletCgroup(1)
    cluster = CgroupCluster(first)
    watcher = Watcher(*own_rules(cluster))  # the default policy, auto
    figures: Figures = {}
    try:
        watcher.wait_ready(60)
        pm1 = cluster.start()
        figures["first_score"] = score_reaches(pm1, -1000, 30)
        note1 = watcher.wait_for_log(f"pid={pm1}: oom_score_adj -1000 instead of -900", 30)
        expect(first.kernel_path in note1, "the note does not name the first cgroup", **figures)
        cluster.stop()
        second_flag_before = second.read("memory.oom.group")
        cluster.move_to(second)
        pm2 = cluster.start()
        figures["second_score"] = score_reaches(pm2, -1000, 30)
        log = watcher.wait_for_log(f"pid={pm2}: oom_score_adj -1000 instead of -900", 30)
        line = next(x for x in log.splitlines() if f"pid={pm2}: oom_score_adj -1000" in x)
        figures.update(pm1=pm1, pm2=pm2, second_flag_before=second_flag_before)
        expect(
            second.kernel_path in line, "the second note does not name the new cgroup", **figures
        )
        wait_for(lambda: len(children_of(pm2)) >= 3, 30, what="the new postmaster's children")
        children = children_scores(pm2)
        figures["second_children_scores"] = sorted(set(children))
        expect(-1000 not in children, "a child of the new postmaster is at -1000", **figures)
        return figures
    finally:
        _save(ctx, "gk-restart", watcher)
        watcher.stop()
        cluster.destroy()
        first.remove()
        second.remove()


@check("group kill: verify exits 7 for -900 in a group-kill cgroup, 0 after auto")
def verify_exit_codes(ctx: Context) -> Figures:
    with cluster_in(oom_group=1, launcher_score=-900) as (cluster, _cgroup):
        pm = cluster.start()
        args = ["verify", "--score", "-900", "--timeout", "2", *own_rules(cluster)]
        before = pgoom(*args)
        watcher = Watcher(*own_rules(cluster))
        try:
            watcher.wait_ready(60)
            score_reaches(pm, -1000, 30)
            after = pgoom(*args)
        finally:
            _save(ctx, "gk-verify", watcher)
            watcher.stop()
        figures: Figures = {
            "before_exit": before.returncode,
            "before": (before.stdout + before.stderr).strip()[-300:],
            "after_exit": after.returncode,
        }
        expect(before.returncode == 7, "verify did not exit 7 for -900 in a group kill", **figures)
        expect(after.returncode == 0, "verify did not exit 0 after auto", **figures)
        return figures


@check("group kill: status and doctor read the postmaster's cgroup, not their own")
def status_and_doctor(ctx: Context) -> Figures:
    with cluster_in(oom_group=1, launcher_score=-900) as (cluster, cgroup):
        pm = cluster.start()
        status = pgoom("status", "--json", "--score", "-900", *own_rules(cluster)[:0])
        rows = {r["pid"]: r for r in json.loads(status.stdout)}
        doctor = pgoom("doctor", "--json")
        report = json.loads(doctor.stdout)
        group = next(c for c in report["checks"] if c["name"] == "memory.oom.group")
        row = rows.get(pm, {})
        figures: Figures = {
            "status_cgroup": row.get("cgroup"),
            "survives": row.get("survives_group_kill"),
            "doctor": group,
        }
        expect(
            row.get("cgroup", {}).get("path") == cgroup.kernel_path,
            "status: wrong cgroup",
            **figures,
        )
        expect(row.get("survives_group_kill") is False, "status: says it survives", **figures)
        expect(
            group["status"] == "fail" and f"pid {pm}" in group["detail"],
            "doctor does not fail on the postmaster's group kill",
            **figures,
        )
        return figures


@check("group kill: -1000 refused without CAP_SYS_RESOURCE: one clear error, pgoom keeps going")
def refused_without_capability(ctx: Context) -> Figures:
    with cluster_in(oom_group=1) as (cluster, _cgroup):
        # The watcher without CAP_SYS_RESOURCE, as an unprivileged sidecar would be.
        prefix = ["setpriv", "--bounding-set=-sys_resource", "--inh-caps=-sys_resource"]
        args = ["--verify-interval", "0.5", "--log-level", "DEBUG", *own_rules(cluster)]
        watcher = Watcher(*args, prefix=prefix)
        try:
            watcher.wait_ready(60)
            pm = cluster.start()

            def refusals(level: str) -> list[str]:
                return [
                    x
                    for x in watcher.text().splitlines()
                    if f" {level} " in x[:40] and "will not survive a group kill" in x
                ]

            # Every verify tick retries and meets the refusal again: at DEBUG after the first.
            wait_for(lambda: len(refusals("DEBUG")) >= 3, 60, 0.05, what="three retries")
            errors = refusals("ERROR")
            figures: Figures = {
                "errors": errors,
                "score": read_score(pm),
                "alive": watcher.proc.poll() is None,
            }
            expect(len(errors) == 1, "not exactly one error for the postmaster", **figures)
            expect(
                f"pid={pm}" in errors[0] and "CAP_SYS_RESOURCE" in errors[0],
                "the error does not name the postmaster and the capability",
                **figures,
            )
            expect(figures["alive"], "pgoom stopped", **figures)
            return figures
        finally:
            _save(ctx, "gk-refused", watcher)
            watcher.stop()


@check("group kill: ungroup on a read-only cgroupfs: one clear error naming the mount")
def ungroup_read_only(ctx: Context) -> Figures:
    with cluster_in(oom_group=1) as (cluster, cgroup):
        # pgoom in a mount namespace of its own with the cgroupfs read-only, as the DaemonSet
        # with its default readOnly: true mount.
        inner = " ".join(
            [*PGOOM, "watch", "--log-file", "''", "--group-kill", "ungroup"]
            + [f"'{a}'" for a in own_rules(cluster)]
        )
        script = (
            f"mount -o remount,bind,ro {V2_ROOT} || {{ echo 'remount failed' >&2; exit 1; }}; "
            f"exec {inner}"
        )
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]

        def body() -> Figures:
            pm = cluster.start()
            score_reaches(pm, -900, 60)
            return {"score": read_score(pm)}

        figures, log = _run_namespaced(ctx, "gk-read-only", argv, body)
        errors = [x for x in log.splitlines() if "cannot clear memory.oom.group" in x]
        figures.update(errors=errors, flag=cgroup.read("memory.oom.group"))
        expect(len(errors) == 1, "not exactly one ungroup error", log=log[-600:], **figures)
        expect("read-only" in errors[0] and "readOnly: false" in errors[0],
               "the error does not say read-only and what to mount", **figures)  # fmt: skip
        expect(figures["flag"] == "1", "the flag changed on a read-only mount", **figures)
        return figures


def _in_cgroup_namespace(sidecar: KubeletCgroup, host_mount: bool, args: list[str]) -> list[str]:
    """argv for pgoom watch in its own cgroup namespace rooted at `sidecar`, with a fresh
    cgroup2 mount there (only its own cgroup visible: a sidecar); with `host_mount` also the
    whole hierarchy at /host/sys/fs/cgroup (the DaemonSet's hostPath mount)."""
    quoted = " ".join(f"'{a}'" for a in [*PGOOM, "watch", "--log-file", "", *args])
    bind = (
        "mkdir -p /host/sys/fs/cgroup && mount --bind /sys/fs/cgroup /host/sys/fs/cgroup && "
        if host_mount
        else ""
    )
    script = (
        f"echo $$ > {sidecar.path}/cgroup.procs && exec unshare -C -m --propagation private "
        f'sh -c "{bind}umount -l /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup && '
        f'exec {quoted}"'
    )
    return ["sh", "-c", script]


def _run_namespaced(
    ctx: Context, name: str, argv: list[str], body: Callable[[], Figures]
) -> tuple[Figures, str]:
    """Run `argv` (pgoom watch, namespaced) while `body` checks; returns body's figures and
    pgoom's log (stderr)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        figures = body()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[1]
        with open(ctx.log_path(name, "pgoom.log"), "w") as f:
            f.write(out)
    return figures, out


@check("group kill: a cgroup not visible here (sidecar): auto assumes the group kill, -1000")
def sidecar_view(ctx: Context) -> Figures:
    sidecar = KubeletCgroup(0)
    try:
        with cluster_in(oom_group=1) as (cluster, _cgroup):
            argv = _in_cgroup_namespace(sidecar, False, own_rules(cluster))
            figures, log = _run_namespaced(
                ctx,
                "gk-sidecar",
                argv,
                lambda: {"score": score_reaches(cluster.start(), -1000, 60)},
            )
            expect(
                "is not visible here" in log, "no line saying the flag is not visible", **figures
            )
            return figures
    finally:
        sidecar.remove()


@check("group kill: DaemonSet view (host cgroupfs, cgroup namespace): ungroup clears the flag")
def daemonset_view(ctx: Context) -> Figures:
    ds = KubeletCgroup(0)
    try:
        with cluster_in(oom_group=1) as (cluster, cgroup):
            argv = _in_cgroup_namespace(ds, True, ["--group-kill", "ungroup", *own_rules(cluster)])

            def body() -> Figures:
                score = score_reaches(cluster.start(), -900, 60)
                wait_for(
                    lambda: cgroup.read("memory.oom.group") == "0",
                    30,
                    0.05,
                    what="memory.oom.group 0",
                )
                return {"score": score, "flag": cgroup.read("memory.oom.group")}

            figures, log = _run_namespaced(ctx, "gk-daemonset", argv, body)
            expect("memory.oom.group=0 in" in log, "no line saying the flag was cleared", **figures)
            return figures
    finally:
        ds.remove()
