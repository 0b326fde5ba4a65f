"""Fake /proc trees built from the real samples captured in tests/unit/samples/.

    tree = FakeProc(tmp_path)
    pm = tree.install("postmaster", uid=os.getuid())      # the captured postmaster
    tree.data_dir(pm.data_dir, pidfile=f"{pm.pid}\\n{pm.data_dir}\\n")
    facts = identity.inspect(tree.procfs, pm.pid)

Layout: <base>/proc/<pid>/{stat,cmdline,status,environ,oom_score_adj,oom_score} as captured,
exe and cwd as symlinks to the captured targets (dangling is fine: only readlink is used),
root -> <base>/rootfs (the process's view of the file system, where data directories are
made), task/<pid>/children from the installed processes' parents, ns/pid a symlink like the
kernel's. <base>/proc/stat carries btime.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from watcher.procfs import ProcFS

SAMPLES = Path(__file__).parent / "samples"
BTIME = 1_700_000_000
PID_NS = "pid:[4026531836]"


@dataclass
class Sample:
    """One captured process, as read back from tests/unit/samples/<name>/."""

    name: str
    pid: int
    stat: str
    cmdline: bytes
    status: str
    environ: bytes
    exe: Optional[str]
    cwd: Optional[str]
    data_dir: Optional[str]
    pidfile: Optional[str]
    oom_score_adj: int

    @property
    def ppid(self) -> int:
        return int(self.stat[self.stat.rindex(")") + 2 :].split()[1])


def load(name: str) -> Sample:
    where = SAMPLES / name
    meta = json.loads((where / "meta.json").read_text())
    pidfile = where / "postmaster.pid"
    return Sample(
        name=name,
        pid=meta["pid"],
        stat=(where / "stat").read_bytes().decode("utf-8", "surrogateescape"),
        cmdline=(where / "cmdline").read_bytes(),
        status=(where / "status").read_text(),
        environ=(where / "environ").read_bytes(),
        exe=meta["exe"],
        cwd=meta["cwd"],
        data_dir=meta["data_dir"],
        pidfile=pidfile.read_text() if pidfile.exists() else None,
        oom_score_adj=meta["oom_score_adj"],
    )


def sample_names() -> list[str]:
    return sorted(p.name for p in SAMPLES.iterdir() if (p / "meta.json").exists())


def restat(stat: str, pid: int, ppid: int, state: Optional[str], starttime: Optional[int]) -> str:
    """A stat line with pid, ppid (and optionally state and start time) replaced; comm,
    however hostile, is kept byte for byte."""
    close = stat.rindex(")")
    head = stat[: stat.index("(")]
    fields = stat[close + 2 :].split(" ")
    fields[1] = str(ppid)
    if state is not None:
        fields[0] = state
    if starttime is not None:
        fields[19] = str(starttime)
    return f"{pid} " + stat[len(head) : close + 2] + " ".join(fields)


def restatus(status: str, pid: int, ppid: int, uid: Optional[int], nspid: list[int]) -> str:
    def sub(key: str, value: str, text: str) -> str:
        return re.sub(rf"^{key}:\t.*$", f"{key}:\t{value}", text, flags=re.MULTILINE)

    status = sub("Pid", str(pid), status)
    status = sub("Tgid", str(pid), status)
    status = sub("PPid", str(ppid), status)
    status = sub("NSpid", "\t".join(map(str, nspid)), status)
    status = sub("NStgid", "\t".join(map(str, nspid)), status)
    if uid is not None:
        status = sub("Uid", "\t".join([str(uid)] * 4), status)
    return status


class FakeProc:
    def __init__(self, base: Path, host_root: bool = False) -> None:
        """host_root=False: the processes live in <base>/rootfs, as in a container or chroot
        (the host reads their cwd link as <base>/rootfs/...). host_root=True: they share
        the test's root, so data directories must be real paths (under tmp_path)."""
        self.base = Path(base)
        self.proc = self.base / "proc"
        self.rootfs = Path("/") if host_root else self.base / "rootfs"
        self.proc.mkdir(parents=True, exist_ok=True)
        self.rootfs.mkdir(parents=True, exist_ok=True)
        (self.proc / "stat").write_text(f"cpu  1 2 3 4\nbtime {BTIME}\nprocesses 99\n")
        self.ppids: dict[int, int] = {}

    @property
    def procfs(self) -> ProcFS:
        return ProcFS(str(self.proc))

    def install(
        self,
        name: str,
        *,
        pid: Optional[int] = None,
        ppid: Optional[int] = None,
        uid: Optional[int] = None,
        state: Optional[str] = None,
        starttime: Optional[int] = None,
        argv: Optional[list[str]] = None,
        exe: Optional[str] = "",
        cwd: Optional[str] = "",
        environ: Optional[dict[str, str]] = None,
        nspid: Optional[list[int]] = None,
        pid_ns: str = PID_NS,
    ) -> Sample:
        """Install the captured process `name`, optionally renumbered or altered. exe/cwd:
        "" keeps the captured link, None leaves the link out (as for a kernel thread)."""
        sample = load(name)
        pid = sample.pid if pid is None else pid
        ppid = sample.ppid if ppid is None else ppid
        where = self.proc / str(pid)
        where.mkdir()
        (where / "stat").write_bytes(
            restat(sample.stat, pid, ppid, state, starttime).encode("utf-8", "surrogateescape")
        )
        cmdline = sample.cmdline if argv is None else b"".join(a.encode() + b"\0" for a in argv)
        (where / "cmdline").write_bytes(cmdline)
        (where / "status").write_text(restatus(sample.status, pid, ppid, uid, nspid or [pid]))
        env = (
            sample.environ
            if environ is None
            else b"".join(f"{k}={v}".encode() + b"\0" for k, v in environ.items())
        )
        (where / "environ").write_bytes(env)
        (where / "oom_score_adj").write_text(f"{sample.oom_score_adj}\n")
        (where / "oom_score").write_text("666\n")
        exe_target = sample.exe if exe == "" else exe
        if exe_target is not None:
            (where / "exe").symlink_to(exe_target)
        cwd_target = sample.cwd if cwd == "" else cwd
        if cwd_target is not None:
            # The process's cwd as the host sees it: inside its root.
            (where / "cwd").symlink_to(self._host_path(cwd_target))
        (where / "root").symlink_to(self.rootfs)
        (where / "ns").mkdir()
        (where / "ns" / "pid").symlink_to(pid_ns)
        (where / "task" / str(pid)).mkdir(parents=True)
        self.ppids[pid] = ppid
        self._write_children()
        sample.pid = pid
        return sample

    def _write_children(self) -> None:
        for pid in self.ppids:
            kids = sorted(p for p, parent in self.ppids.items() if parent == pid)
            text = "".join(f"{k} " for k in kids)
            (self.proc / str(pid) / "task" / str(pid) / "children").write_text(text)

    def data_dir(self, path: str, pidfile: Optional[str] = None, mode: int = 0o700) -> Path:
        """Make `path` inside the processes' root, owned by the test's uid, with an
        optional postmaster.pid holding `pidfile`."""
        where = Path(self._host_path(path))
        where.mkdir(parents=True, exist_ok=True)
        where.chmod(mode)
        if pidfile is not None:
            (where / "postmaster.pid").write_text(pidfile)
        return where

    def _host_path(self, path: str) -> str:
        return path if self.rootfs == Path("/") else str(self.rootfs) + path

    def remove(self, pid: int) -> None:
        """The process exited: its directory goes away."""
        shutil.rmtree(self.proc / str(pid))
        self.ppids.pop(pid, None)
        self._write_children()


def pidfile_text(pid: int, data_dir: str, port: int = 5432) -> str:
    """A complete postmaster.pid as PostgreSQL 15 writes it."""
    return f"{pid}\n{data_dir}\n{BTIME + 100}\n{port}\n/tmp\n\n  5432001     32768\nready   \n"
