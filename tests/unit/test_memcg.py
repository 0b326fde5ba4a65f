"""watcher.memcg on captured /proc/<pid>/cgroup and mountinfo lines and on fake cgroup trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from watcher import memcg
from watcher.procfs import ProcFS

# Captured on this project's test machine (hybrid: v1 memory, empty unified hierarchy).
HYBRID_CGROUP = "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/2cd5c1ac\n3:cpuset:/\n0::/\n"
HYBRID_MOUNTINFO = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)
# A cgroup v2 Kubernetes node (host view) and a container's own view of its cgroup2 mount.
K8S_PATH = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podab.slice/cri-x.scope"
V2_MOUNTINFO = "30 22 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_parse_proc_cgroup_hybrid() -> None:
    lines = memcg.parse_proc_cgroup(HYBRID_CGROUP)
    assert memcg.memory_cgroup_line(lines) == (1, "/process_api/2cd5c1ac")


def test_parse_proc_cgroup_v2_only() -> None:
    assert memcg.memory_cgroup_line(memcg.parse_proc_cgroup(f"0::{K8S_PATH}\n")) == (2, K8S_PATH)


def test_parse_proc_cgroup_garbage_lines_skipped() -> None:
    lines = memcg.parse_proc_cgroup("garbage\nx:memory:/a\n\n0::/ok\n")
    assert memcg.memory_cgroup_line(lines) == (2, "/ok")


def test_parse_cgroup_mounts() -> None:
    mounts = memcg.parse_cgroup_mounts(HYBRID_MOUNTINFO)
    assert [(m.version, m.mount_point) for m in mounts] == [
        (1, "/sys/fs/cgroup/memory"),
        (1, "/sys/fs/cgroup/systemd"),
        (2, "/sys/fs/cgroup/unified"),
    ]
    assert "memory" in mounts[0].controllers


def test_mountinfo_escapes() -> None:
    line = "41 31 0:38 /a\\040b /mnt/cg\\040x rw - cgroup2 cgroup2 rw\n"
    (mount,) = memcg.parse_cgroup_mounts(line)
    assert (mount.root, mount.mount_point) == ("/a b", "/mnt/cg x")


@pytest.mark.parametrize(
    ("path", "root", "point", "expected"),
    [
        ("/", "/", "/sys/fs/cgroup", "/sys/fs/cgroup"),
        (K8S_PATH, "/", "/sys/fs/cgroup", f"/sys/fs/cgroup{K8S_PATH}"),
        # A bind mount of a subtree: the part above it is cut off.
        ("/kubepods.slice/x", "/kubepods.slice", "/host/cg", "/host/cg/x"),
        # A sibling container seen from inside a cgroup namespace: not visible.
        ("/../cri-y.scope", "/", "/sys/fs/cgroup", None),
        ("/other/x", "/kubepods.slice", "/host/cg", None),
        ("/a/../../etc", "/", "/sys/fs/cgroup", None),
        ("/a\nb", "/", "/sys/fs/cgroup", None),
        ("/" + "x" * 5000, "/", "/sys/fs/cgroup", None),
    ],
)
def test_cgroup_dir(path: str, root: str, point: str, expected: object) -> None:
    assert memcg.cgroup_dir(path, root, point) == expected


@pytest.mark.parametrize(
    ("text", "version", "expected"),
    [
        ("max\n", 2, None),
        ("314572800\n", 2, 314572800),
        ("9223372036854771712\n", 1, None),
        ("314572800\n", 1, 314572800),
        ("garbage", 2, None),
        ("", 1, None),
    ],
)
def test_parse_limit(text: str, version: int, expected: object) -> None:
    assert memcg.parse_limit(text, version) == expected


def test_working_set_never_negative() -> None:
    assert memcg.working_set(100, 30) == 70
    assert memcg.working_set(100, 300) == 0
    assert memcg.working_set(None, 3) is None


class Tree:
    """A fake /proc and cgroupfs under one temporary directory."""

    def __init__(self, base: Path, mountinfo: str) -> None:
        self.base = base
        (base / "proc" / "self").mkdir(parents=True)
        (base / "proc" / "self" / "mountinfo").write_text(mountinfo)
        self.view = memcg.CgroupView(ProcFS(str(base / "proc")), fs_root=str(base))

    def process(self, pid: int, cgroup_text: str) -> None:
        (self.base / "proc" / str(pid)).mkdir()
        (self.base / "proc" / str(pid) / "cgroup").write_text(cgroup_text)

    def cgroup(self, path: str, **files: str) -> Path:
        where = self.base / path.lstrip("/")
        where.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (where / name).write_text(text)
        return where


V2_STAT = "anon 209715200\nfile 52428800\ninactive_file 41943040\nactive_file 10485760\n"


def test_v2_state(tmp_path: Path) -> None:
    tree = Tree(tmp_path, V2_MOUNTINFO)
    tree.process(4242, f"0::{K8S_PATH}\n")
    tree.cgroup(
        f"/sys/fs/cgroup{K8S_PATH}",
        **{
            "memory.max": "314572800\n",
            "memory.current": "262144000\n",
            "memory.stat": V2_STAT,
            "memory.oom.group": "1\n",
            "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 1\n",
        },
    )
    cg = tree.view.locate(4242)
    assert cg == memcg.MemCgroup(2, K8S_PATH, f"/sys/fs/cgroup{K8S_PATH}")
    state = tree.view.state(cg)
    assert state is not None
    assert state.limit_bytes == state.effective_limit_bytes == 314572800
    assert state.working_set_bytes == 262144000 - 41943040
    assert state.oom_group is True and state.oom_kills == 1
    assert memcg.group_kill(cg, state) is True


def test_v2_limit_inherited_from_ancestor(tmp_path: Path) -> None:
    tree = Tree(tmp_path, V2_MOUNTINFO)
    tree.process(7, "0::/system.slice/postgresql@15-main.service\n")
    tree.cgroup("/sys/fs/cgroup/system.slice", **{"memory.max": "1073741824\n"})
    tree.cgroup(
        "/sys/fs/cgroup/system.slice/postgresql@15-main.service",
        **{"memory.max": "max\n", "memory.current": "1000\n", "memory.oom.group": "0\n"},
    )
    cg = tree.view.locate(7)
    assert cg is not None
    state = tree.view.state(cg)
    assert state is not None
    assert state.limit_bytes is None
    assert state.effective_limit_bytes == 1073741824
    assert state.limit_directory == "/sys/fs/cgroup/system.slice"
    assert memcg.group_kill(cg, state) is False


def test_v2_sibling_not_visible(tmp_path: Path) -> None:
    tree = Tree(tmp_path, V2_MOUNTINFO)
    tree.process(9, "0::/../cri-db.scope\n")
    cg = tree.view.locate(9)
    assert cg == memcg.MemCgroup(2, "/../cri-db.scope", None)
    assert tree.view.state(cg) is None
    assert memcg.group_kill(cg, None) is None


def test_v1_state(tmp_path: Path) -> None:
    tree = Tree(tmp_path, HYBRID_MOUNTINFO)
    tree.process(11, "4:memory:/pgtest\n0::/\n")
    tree.cgroup(
        "/sys/fs/cgroup/memory/pgtest",
        **{
            "memory.limit_in_bytes": "314572800\n",
            "memory.usage_in_bytes": "283115520\n",
            "memory.stat": "cache 20000000\nrss 250000000\ninactive_file 1000\n"
            "hierarchical_memory_limit 314572800\ntotal_inactive_file 19000000\n",
            "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        },
    )
    cg = tree.view.locate(11)
    assert cg == memcg.MemCgroup(1, "/pgtest", "/sys/fs/cgroup/memory/pgtest")
    state = tree.view.state(cg)
    assert state is not None
    assert state.limit_bytes == 314572800
    assert state.working_set_bytes == 283115520 - 19000000
    assert state.oom_group is None and state.oom_kills == 2
    assert memcg.group_kill(cg, state) is False


def test_fifo_in_cgroup_dir_does_not_block(tmp_path: Path, alarm: None) -> None:
    tree = Tree(tmp_path, V2_MOUNTINFO)
    tree.process(12, "0::/x\n")
    where = tree.cgroup("/sys/fs/cgroup/x")
    os.mkfifo(where / "memory.current")
    cg = tree.view.locate(12)
    assert cg is not None
    state = tree.view.state(cg)
    assert state is not None and state.usage_bytes is None


def test_write_oom_group_refuses_symlink(tmp_path: Path) -> None:
    tree = Tree(tmp_path, V2_MOUNTINFO)
    tree.process(13, "0::/y\n")
    where = tree.cgroup("/sys/fs/cgroup/y")
    target = tmp_path / "elsewhere"
    target.write_text("1\n")
    (where / "memory.oom.group").symlink_to(target)
    cg = tree.view.locate(13)
    assert cg is not None
    with pytest.raises(OSError):
        tree.view.write_oom_group(cg, False)
    assert target.read_text() == "1\n"


def test_write_oom_group(tmp_path: Path) -> None:
    tree = Tree(tmp_path, V2_MOUNTINFO)
    tree.process(14, "0::/z\n")
    where = tree.cgroup("/sys/fs/cgroup/z", **{"memory.oom.group": "1\n"})
    cg = tree.view.locate(14)
    assert cg is not None
    tree.view.write_oom_group(cg, False)
    assert (where / "memory.oom.group").read_text().strip() == "0"


def test_v1_cgroup_cannot_be_ungrouped(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        memcg.CgroupView(ProcFS(str(tmp_path))).write_oom_group(
            memcg.MemCgroup(1, "/a", "/sys/fs/cgroup/memory/a"), False
        )


# The DaemonSet: its own cgroup namespace, the host's cgroupfs mounted at /host/sys/fs/cgroup.
# Both mounts' roots and the postmaster's path are printed relative to pgoom's namespace.
DS_MOUNTINFO = (
    "30 22 0:26 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    "41 22 0:26 /../../.. /host/sys/fs/cgroup ro,relatime - cgroup2 cgroup2 rw,nsdelegate\n"
)
DB_TAIL = "kubepods-burstable.slice/kubepods-burstable-podab.slice/cri-containerd-db.scope"


@pytest.mark.parametrize(
    ("path", "root", "expected"),
    [
        ("/../../" + DB_TAIL, "/../../..", (1, DB_TAIL.split("/"))),
        ("/../../" + DB_TAIL, "/", None),  # the own mount: outside it
        ("/x", "/../..", (2, ["x"])),
        ("/../a/../b", "/../../..", None),  # '..' after a name: never followed
        ("/../../x", "/../../../sub", None),  # a mount of a named subtree: no gap to fill
    ],
)
def test_unresolved_depth(path: str, root: str, expected: object) -> None:
    assert memcg.unresolved_depth(path, root) == expected


def test_daemonset_finds_the_container_through_the_host_mount(tmp_path: Path) -> None:
    tree = Tree(tmp_path, DS_MOUNTINFO)
    tree.process(21, f"0::/../../{DB_TAIL}\n")
    tree.cgroup("/sys/fs/cgroup")  # pgoom's own (namespace root)
    tree.cgroup("/host/sys/fs/cgroup/system.slice")
    where = tree.cgroup(
        f"/host/sys/fs/cgroup/kubepods.slice/{DB_TAIL}", **{"memory.oom.group": "1\n"}
    )
    cg = tree.view.locate(21)
    assert cg is not None
    assert cg.directory == f"/host/sys/fs/cgroup/kubepods.slice/{DB_TAIL}"
    assert tree.view.highest_oom_group(cg) == cg.directory
    tree.view.write_oom_group(cg, False)
    assert (where / "memory.oom.group").read_text().strip() == "0"


def test_daemonset_ambiguous_match_is_not_visible(tmp_path: Path) -> None:
    tree = Tree(tmp_path, DS_MOUNTINFO)
    tree.process(22, "0::/../../x/ctr\n")
    tree.cgroup("/host/sys/fs/cgroup/a/x/ctr")
    tree.cgroup("/host/sys/fs/cgroup/b/x/ctr")
    cg = tree.view.locate(22)
    assert cg is not None and cg.directory is None
