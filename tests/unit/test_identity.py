"""identity.inspect and ProcFS on fake /proc trees built from captured samples."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from tests.unit.fakeproc import BTIME, FakeProc, load, pidfile_text
from watcher.errors import ProcessGone
from watcher.identity import inspect
from watcher.match import confirm
from watcher.procfs import CLOCK_TICKS, read_file_text

ME = os.getuid()  # fake processes run as the test's uid, which owns the fake data dirs
OTHER = 65534 if ME != 65534 else 65533


@pytest.fixture
def tree(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path)


def running_postmaster(tree: FakeProc, name: str = "postmaster", **kw: object) -> tuple[int, str]:
    sample = tree.install(name, uid=ME, **kw)  # type: ignore[arg-type]
    assert sample.data_dir is not None
    tree.data_dir(sample.data_dir, pidfile=pidfile_text(sample.pid, sample.data_dir))
    return sample.pid, sample.data_dir


# --- acceptance --------------------------------------------------------------------------


def test_inspect_the_captured_postmaster(tree: FakeProc) -> None:
    pid, data_dir = running_postmaster(tree)
    facts = inspect(tree.procfs, pid)
    assert facts.binary == "postgres"
    assert facts.uid == ME
    assert facts.data_dir == data_dir
    assert facts.data_dir_uid == ME
    assert facts.pidfile_state == "ok"
    assert facts.pidfile is not None and facts.pidfile.pid == pid
    assert not facts.pidfile_names_live_postgres
    verdict = confirm(facts)
    assert verdict.ok and verdict.confirmed


def test_inspect_named_cluster_with_its_children_present(tree: FakeProc) -> None:
    pid, _ = running_postmaster(tree, "named_postmaster")
    for child in ("named_checkpointer", "named_walwriter", "named_backend"):
        tree.install(child, uid=ME)
    assert confirm(inspect(tree.procfs, pid)).confirmed
    assert sorted(tree.procfs.children(pid)) == sorted(
        load(n).pid for n in ("named_checkpointer", "named_walwriter", "named_backend")
    )
    backend = load("named_backend").pid
    verdict = confirm(inspect(tree.procfs, backend))
    assert not verdict.ok
    assert "backend" in verdict.reason


def test_data_dir_from_pgdata(tree: FakeProc) -> None:
    sample = tree.install(
        "postmaster",
        uid=ME,
        argv=["/usr/lib/postgresql/15/bin/postgres"],
        environ={"PGDATA": "/pgdata/from-env"},
    )
    tree.data_dir("/pgdata/from-env", pidfile_text(sample.pid, "/pgdata/from-env"))
    facts = inspect(tree.procfs, sample.pid)
    assert facts.data_dir == "/pgdata/from-env"
    assert confirm(facts).confirmed


def test_data_dir_from_cwd(tree: FakeProc) -> None:
    # Neither -D nor PGDATA: a running postmaster sits in its data directory.
    sample = tree.install("postmaster", uid=ME, argv=["postgres"], environ={}, cwd="/srv/db")
    tree.data_dir("/srv/db", pidfile_text(sample.pid, "/srv/db"))
    facts = inspect(tree.procfs, sample.pid)
    assert facts.data_dir == str(tree.rootfs) + "/srv/db"  # the link target, as read
    assert facts.pidfile is not None and facts.pidfile.pid == sample.pid


def test_data_dir_cwd_without_pidfile_is_no_data_dir(tree: FakeProc) -> None:
    sample = tree.install("postmaster", uid=ME, argv=["postgres"], environ={}, cwd="/srv/db")
    tree.data_dir("/srv/db")
    facts = inspect(tree.procfs, sample.pid)
    assert facts.data_dir is None
    assert not confirm(facts).ok


def test_relative_data_dir_once_the_postmaster_sits_in_it(tree: FakeProc) -> None:
    # `postgres -D pg16` from /pgdata: after start-up its cwd is the data directory.
    sample = tree.install("postmaster", uid=ME, argv=["postgres", "-D", "pg16"], cwd="/pgdata/pg16")
    tree.data_dir("/pgdata/pg16", pidfile_text(sample.pid, "/pgdata/pg16"))
    facts = inspect(tree.procfs, sample.pid)
    assert facts.data_dir == str(tree.rootfs) + "/pgdata/pg16"  # the host's view of it
    assert confirm(facts).confirmed


def test_relative_data_dir_right_after_exec(tmp_path: Path) -> None:
    # The exec instant, before the chdir: resolved against the cwd.
    tree = FakeProc(tmp_path, host_root=True)
    parent = tmp_path / "pgdata"
    sample = tree.install("postmaster", uid=ME, argv=["postgres", "-D", "pg16"], cwd=str(parent))
    tree.data_dir(str(parent), mode=0o755)
    tree.data_dir(str(parent / "pg16"), pidfile_text(sample.pid, str(parent / "pg16")))
    facts = inspect(tree.procfs, sample.pid)
    assert facts.data_dir == str(parent / "pg16")
    assert confirm(facts).confirmed


def test_stale_pidfile_is_accepted(tree: FakeProc) -> None:
    sample = tree.install("postmaster", uid=ME)
    assert sample.data_dir is not None
    tree.data_dir(sample.data_dir, pidfile_text(31999, sample.data_dir))  # no such pid
    facts = inspect(tree.procfs, sample.pid)
    assert not facts.pidfile_names_live_postgres
    assert not confirm(facts).ok  # a fake tree's executable cannot be judged: lock file only
    verdict = confirm(dataclasses.replace(facts, binary_trusted=True))
    assert verdict.ok and not verdict.confirmed
    assert "stale" in verdict.reason


def test_pidfile_naming_a_live_non_postgres_process_is_stale(tree: FakeProc) -> None:
    sample = tree.install("postmaster", uid=ME)
    other = tree.install("hostile_paren")
    assert sample.data_dir is not None
    tree.data_dir(sample.data_dir, pidfile_text(other.pid, sample.data_dir))
    facts = inspect(tree.procfs, sample.pid)
    assert not facts.pidfile_names_live_postgres
    assert confirm(dataclasses.replace(facts, binary_trusted=True)).ok


def test_missing_or_half_written_pidfile(tree: FakeProc) -> None:
    sample = tree.install("postmaster", uid=ME)
    assert sample.data_dir is not None
    tree.data_dir(sample.data_dir)
    assert inspect(tree.procfs, sample.pid).pidfile_state == "missing"
    tree.data_dir(sample.data_dir, pidfile=str(sample.pid))  # no newline yet
    facts = inspect(tree.procfs, sample.pid)
    assert (facts.pidfile_state, facts.pidfile) == ("missing", None)
    assert "not written yet" in confirm(facts).reason


def test_nested_pid_namespace_pidfile(tree: FakeProc) -> None:
    # In a container the lock file holds the namespace-local PID (1 for a postgres run
    # as the container's init).
    sample = tree.install("postmaster", uid=ME, nspid=[load("postmaster").pid, 1])
    assert sample.data_dir is not None
    tree.data_dir(sample.data_dir, pidfile_text(1, sample.data_dir))
    facts = inspect(tree.procfs, sample.pid)
    assert facts.pidfile is not None and facts.pidfile.pid == sample.pid
    assert confirm(facts).confirmed


# --- rejection ----------------------------------------------------------------------------


def test_pidfile_naming_another_live_postmaster(tree: FakeProc) -> None:
    # A second `postgres -D` on a running cluster's directory (it would fail its lock in a
    # moment): the lock file names the running one.
    running, data_dir = running_postmaster(tree, "named_postmaster")
    second = tree.install(
        "postmaster", uid=ME, argv=["/usr/lib/postgresql/15/bin/postgres", "-D", data_dir]
    )
    facts = inspect(tree.procfs, second.pid)
    assert facts.pidfile_names_live_postgres
    verdict = confirm(facts)
    assert not verdict.ok
    assert verdict.reason == f"postmaster.pid names running postmaster {running}"


def test_nested_namespace_pidfile_naming_another_live_postgres(tree: FakeProc) -> None:
    running, data_dir = running_postmaster(tree, "named_postmaster", nspid=[0, 7])
    # fix the host pid in NSpid (install put 0 as a placeholder)
    status = tree.proc / str(running) / "status"
    status.write_text(status.read_text().replace("NSpid:\t0\t7", f"NSpid:\t{running}\t7"))
    tree.data_dir(data_dir, pidfile_text(7, data_dir))
    second = tree.install(
        "postmaster",
        uid=ME,
        argv=["postgres", "-D", data_dir],
        nspid=[load("postmaster").pid, 9],
    )
    facts = inspect(tree.procfs, second.pid)
    assert facts.pidfile_names_live_postgres
    assert not confirm(facts).ok


def test_another_uid_than_the_data_dir_owner(tree: FakeProc) -> None:
    sample = tree.install("postmaster", uid=OTHER)
    assert sample.data_dir is not None
    tree.data_dir(sample.data_dir, pidfile_text(sample.pid, sample.data_dir))
    facts = inspect(tree.procfs, sample.pid)
    assert (facts.uid, facts.data_dir_uid) == (OTHER, ME)
    verdict = confirm(facts)
    assert not verdict.ok
    assert f"belongs to uid {ME}, the process runs as uid {OTHER}" in verdict.reason


def test_script_called_postgres(tree: FakeProc) -> None:
    sample = tree.install("script_postgres", uid=ME, cwd="/")
    tree.data_dir("/pgdata/pg16")
    facts = inspect(tree.procfs, sample.pid)
    assert facts.binary == "dash"
    assert facts.data_dir == "/pgdata/pg16"
    assert confirm(facts).reason == "executable is dash, not postgres"


def test_renamed_sleep(tree: FakeProc) -> None:
    sample = tree.install(
        "hostile_paren", uid=ME, argv=["postgres", "-D", "/pgdata/pg16"], exe="/usr/bin/sleep"
    )
    tree.data_dir("/pgdata/pg16", pidfile_text(sample.pid, "/pgdata/pg16"))
    assert confirm(inspect(tree.procfs, sample.pid)).reason == "executable is sleep, not postgres"


def test_missing_data_dir(tree: FakeProc) -> None:
    sample = tree.install("postmaster", uid=ME)
    facts = inspect(tree.procfs, sample.pid)
    assert facts.data_dir == sample.data_dir
    assert facts.data_dir_uid is None
    assert confirm(facts).reason.startswith("cannot stat data directory")


def test_vanished_process(tree: FakeProc) -> None:
    sample = tree.install("postmaster", uid=ME)
    tree.remove(sample.pid)
    with pytest.raises(ProcessGone):
        inspect(tree.procfs, sample.pid)


@pytest.mark.parametrize("name", ["kthreadd", "zombie"])
def test_kernel_threads_and_zombies_have_no_exe(tree: FakeProc, name: str) -> None:
    sample = tree.install(name, exe=None, cwd=None)
    with pytest.raises(ProcessGone):
        inspect(tree.procfs, sample.pid)


# --- hostile files in the data directory ------------------------------------------------


def test_fifo_planted_as_pidfile_does_not_hang(tree: FakeProc, alarm: None) -> None:
    sample = tree.install("postmaster", uid=ME)
    assert sample.data_dir is not None
    where = tree.data_dir(sample.data_dir)
    os.mkfifo(where / "postmaster.pid")
    facts = inspect(tree.procfs, sample.pid)
    assert facts.pidfile_state == "missing"


def test_directory_planted_as_pidfile(tree: FakeProc) -> None:
    sample = tree.install("postmaster", uid=ME)
    assert sample.data_dir is not None
    (tree.data_dir(sample.data_dir) / "postmaster.pid").mkdir()
    assert inspect(tree.procfs, sample.pid).pidfile_state == "missing"


def test_read_file_text(tmp_path: Path, alarm: None) -> None:
    assert read_file_text(str(tmp_path / "absent")) is None
    assert read_file_text(str(tmp_path / "absent" / "below")) is None
    (tmp_path / "f").write_text("12\n")
    assert read_file_text(str(tmp_path / "f")) == "12\n"
    assert read_file_text(str(tmp_path / "f" / "below")) is None
    os.mkfifo(tmp_path / "fifo")
    assert read_file_text(str(tmp_path / "fifo")) is None


# --- ProcFS on the fake tree ----------------------------------------------------------------


def test_procfs_reads(tree: FakeProc) -> None:
    pid, _ = running_postmaster(tree)
    tree.install("checkpointer", uid=ME)
    procfs = tree.procfs
    assert sorted(procfs.pids()) == sorted([pid, load("checkpointer").pid])
    assert procfs.oom_score_adj(pid) == 1000
    assert procfs.oom_score(pid) == 666
    assert procfs.boot_time_s() == BTIME
    stat = procfs.stat(pid)
    assert procfs.start_epoch_s(stat) == BTIME + stat.starttime_ticks / CLOCK_TICKS
    assert procfs.children(pid) == [load("checkpointer").pid]
    procfs.write_oom_score_adj(pid, 0)
    assert procfs.oom_score_adj(pid) == 0


def test_procfs_gone(tree: FakeProc) -> None:
    with pytest.raises(ProcessGone):
        tree.procfs.stat(4_000_000)
    with pytest.raises(ProcessGone):
        tree.procfs.exe(4_000_000)
    with pytest.raises(ProcessGone):
        tree.procfs.write_oom_score_adj(4_000_000, 0)
    empty = tree.proc / "123"
    empty.mkdir()
    (empty / "stat").write_text("")
    with pytest.raises(ProcessGone):
        tree.procfs.stat(123)


def test_a_copy_named_postgres_is_checked_by_content(tree: FakeProc, tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "postgres"
    fake.parent.mkdir()
    fake.write_bytes(b"\x7fELF not a server\0")
    sample = tree.install("postmaster", uid=ME, exe=str(fake))
    assert sample.data_dir is not None
    tree.data_dir(sample.data_dir, pidfile_text(sample.pid, sample.data_dir))
    facts = inspect(tree.procfs, sample.pid)
    assert (facts.binary, facts.binary_is_server) == ("postgres", False)
    assert confirm(facts).reason == "executable postgres is not a PostgreSQL server binary"
    fake.write_bytes(b"\x7fELF ...\0PostmasterMain\0...")  # new size: a new cache key
    assert confirm(inspect(tree.procfs, sample.pid)).confirmed


# --- the data directory as the process will lock it (issue 9, item 1) ----------------------


def test_dotdot_out_of_a_covered_dir_resolves_to_where_it_leads(tree: FakeProc) -> None:
    tree.data_dir("/pgdata/pg", mode=0o755)
    tree.data_dir("/tmp/evil")
    sample = tree.install(
        "postmaster", uid=ME, argv=["postgres", "-D", "/pgdata/pg/../../tmp/evil"]
    )
    assert inspect(tree.procfs, sample.pid).data_dir == "/tmp/evil"


def test_a_symlinked_data_dir_resolves_inside_the_processes_root(tree: FakeProc) -> None:
    # An absolute link target is the container's path, not the host's.
    tree.data_dir("/volume/pg16", pidfile="")
    tree.data_dir("/pgdata", mode=0o755)
    (tree.rootfs / "pgdata" / "pg16").symlink_to("/volume/pg16")
    sample = tree.install("postmaster", uid=ME, argv=["postgres", "-D", "/pgdata/pg16"])
    facts = inspect(tree.procfs, sample.pid)
    assert facts.data_dir == "/volume/pg16"
    assert facts.data_dir_uid == ME


@pytest.mark.parametrize("replacement", ["file", "dangling link", "link loop", "fifo"])
def test_a_data_dir_replaced_by_something_else_is_not_located(
    tree: FakeProc, replacement: str, alarm: None
) -> None:
    tree.data_dir("/pgdata", mode=0o755)
    where = tree.rootfs / "pgdata" / "pg16"
    if replacement == "file":
        where.write_text("not a directory\n")
    elif replacement == "dangling link":
        where.symlink_to("/nowhere")
    elif replacement == "link loop":
        where.symlink_to("/pgdata/pg16")
    else:
        os.mkfifo(where)
    sample = tree.install("postmaster", uid=ME, argv=["postgres", "-D", "/pgdata/pg16"])
    facts = inspect(tree.procfs, sample.pid)
    assert facts.data_dir_uid is None
    assert not confirm(facts).ok


def test_a_fifo_as_postmaster_pid_or_postgresql_conf_never_blocks(
    tree: FakeProc, alarm: None
) -> None:
    # The owner of the directory plants FIFOs where root reads: an open() without
    # O_NONBLOCK would hang the watcher until a writer came.
    config = tree.data_dir("/etc/pg/main")
    os.mkfifo(config / "postgresql.conf")
    data = tree.data_dir("/pgdata/pg16")
    os.mkfifo(data / "postmaster.pid")
    for argv in (["postgres", "-D", "/etc/pg/main"], ["postgres", "-D", "/pgdata/pg16"]):
        sample = tree.install("postmaster", uid=ME, argv=argv)
        facts = inspect(tree.procfs, sample.pid)
        assert facts.pidfile is None
        tree.remove(sample.pid)


def test_a_process_whose_uids_differ_is_not_a_postmaster(tree: FakeProc) -> None:
    pid, _ = running_postmaster(tree)
    status = tree.proc / str(pid) / "status"
    status.write_text(
        "\n".join(
            f"Uid:\t{ME}\t{ME}\t{OTHER}\t{ME}" if line.startswith("Uid:") else line
            for line in status.read_text().splitlines()
        )
        + "\n"
    )
    verdict = confirm(inspect(tree.procfs, pid))
    assert not verdict.ok and verdict.cause == "uids"


def test_a_huge_cmdline_or_environ_is_read_bounded(tree: FakeProc) -> None:
    # argv and environment are the process's own, as large as its stack rlimit allows.
    from watcher.procfs import READ_MAX_BYTES

    sample = tree.install("postmaster", uid=ME)
    huge = b"postgres\0-D\0/pgdata/pg16\0" + b"x" * (3 * READ_MAX_BYTES) + b"\0"
    (tree.proc / str(sample.pid) / "cmdline").write_bytes(huge)
    (tree.proc / str(sample.pid) / "environ").write_bytes(b"A=" + b"y" * (3 * READ_MAX_BYTES))
    assert len(tree.procfs.read_bytes(sample.pid, "cmdline")) == READ_MAX_BYTES
    assert len(tree.procfs.environ(sample.pid)) == READ_MAX_BYTES
    assert tree.procfs.cmdline(sample.pid)[:3] == ["postgres", "-D", "/pgdata/pg16"]
