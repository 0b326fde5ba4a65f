"""Pure parsers, on real captured /proc text and on hostile input."""

from __future__ import annotations

import pytest

from tests.unit.fakeproc import load, sample_names
from watcher.limits import CAP_SYS_RESOURCE
from watcher.parse import (
    binary_name,
    capability_set,
    data_dir_from_argv,
    environ_value,
    has_capability,
    is_server_invocation,
    parse_cmdline,
    parse_oom_score_adj,
    parse_postmaster_pid,
    parse_stat,
    parse_status,
    status_uids,
)

# --- parse_stat -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sample_names())
def test_parse_stat_every_captured_sample(name: str) -> None:
    sample = load(name)
    stat = parse_stat(sample.stat)
    assert stat.pid == sample.pid
    assert stat.ppid == sample.ppid
    # status escapes the name ("\n" as two characters); stat holds it raw.
    status_name = parse_status(sample.status)["Name"]
    assert stat.comm == status_name.replace("\\n", "\n")
    assert stat.starttime_ticks > 0


def test_parse_stat_hostile_paren_name() -> None:
    stat = parse_stat(load("hostile_paren").stat)
    assert stat.comm == "foo) Z 1 (bar"
    assert stat.state == "S"  # not the Z inside the name
    assert stat.ppid != 1  # not the 1 inside the name


def test_parse_stat_hostile_newline_name() -> None:
    stat = parse_stat(load("hostile_newline").stat)
    assert stat.comm == "a b\nc) R 9"
    assert stat.state == "S"


def test_parse_stat_zombie_and_kernel_thread() -> None:
    assert parse_stat(load("zombie").stat).state == "Z"
    kthread = parse_stat(load("kthreadd").stat)
    assert (kthread.pid, kthread.ppid, kthread.comm) == (2, 0, "kthreadd")


@pytest.mark.parametrize(
    "comm",
    ["", " ", ")", "((", ") ) )", "x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21"],
)
def test_parse_stat_synthetic_hostile_names(comm: str) -> None:
    line = load("postmaster").stat
    close = line.rindex(")")
    text = f"4242 ({comm}" + line[close:]
    stat = parse_stat(text)
    assert stat.pid == 4242
    assert stat.comm == comm
    assert stat.state == "S"
    assert stat.starttime_ticks == parse_stat(line).starttime_ticks


# --- parse_cmdline ----------------------------------------------------------------------


def test_parse_cmdline_postmaster() -> None:
    sample = load("postmaster")
    assert parse_cmdline(sample.cmdline)[:3] == [
        "/usr/lib/postgresql/15/bin/postgres",
        "-D",
        sample.data_dir,
    ]


@pytest.mark.parametrize("name", ["checkpointer", "named_checkpointer", "backend"])
def test_parse_cmdline_rewritten_title_padded_with_nuls(name: str) -> None:
    # PostgreSQL overwrites argv with its title and pads the rest with NULs.
    argv = parse_cmdline(load(name).cmdline)
    assert len(argv) == 1
    assert argv[0].startswith("postgres: ")


@pytest.mark.parametrize("name", ["kthreadd", "zombie"])
def test_parse_cmdline_empty(name: str) -> None:
    assert parse_cmdline(load(name).cmdline) == []


@pytest.mark.parametrize(
    ("raw", "argv"),
    [
        (b"", []),
        (b"\0", []),  # one empty argument is indistinguishable from padding
        (b"a\0\0b\0", ["a", "", "b"]),  # an empty argument in the middle survives
        (b"no-terminator", ["no-terminator"]),
        (b"x\0-D\0/pg data\0", ["x", "-D", "/pg data"]),
        (b"new\nline\0", ["new\nline"]),
        (b"\xff\xfe\0", ["\udcff\udcfe"]),  # not UTF-8: kept, not an exception
    ],
)
def test_parse_cmdline_edge_cases(raw: bytes, argv: list[str]) -> None:
    assert parse_cmdline(raw) == argv


def test_parse_cmdline_hostile_argv0() -> None:
    assert parse_cmdline(load("hostile_newline").cmdline)[0] == "my prog\nwith ) newline"


# --- status, environ ----------------------------------------------------------------------


def test_status_uids_and_capabilities() -> None:
    fields = parse_status(load("postmaster").status)
    assert status_uids(fields) == (26, 26)
    assert not has_capability(capability_set(fields, "CapEff"), CAP_SYS_RESOURCE)
    assert has_capability(1 << CAP_SYS_RESOURCE, CAP_SYS_RESOURCE)


def test_environ_value() -> None:
    raw = load("postmaster").environ
    assert environ_value(raw, "PG_OOM_ADJUST_VALUE") == "1000"
    assert environ_value(raw, "PG_OOM") is None  # a prefix is not a name
    assert environ_value(b"A=1\0PGDATA=/x=y\0", "PGDATA") == "/x=y"
    assert environ_value(b"", "PGDATA") is None


def test_parse_oom_score_adj() -> None:
    assert parse_oom_score_adj("-900\n") == -900
    with pytest.raises(ValueError):
        parse_oom_score_adj("")


# --- postmaster.pid -----------------------------------------------------------------------


def test_postmaster_pid_captured() -> None:
    sample = load("postmaster")
    assert sample.pidfile is not None
    parsed = parse_postmaster_pid(sample.pidfile)
    assert parsed is not None
    assert parsed.pid == sample.pid
    assert parsed.data_dir == sample.data_dir
    assert parsed.port == 5432
    assert parsed.start_epoch is not None


@pytest.mark.parametrize(
    "text",
    [
        "",  # created, nothing written yet (inotify IN_CREATE)
        "4242",  # line 1 not finished
        "\n",
        "abc\n/pgdata/pg\n",
        "-4242\n/pgdata/pg\n",  # single-user mode: not a postmaster
        "0\n/pgdata/pg\n",
        " \n",
    ],
)
def test_postmaster_pid_partial_empty_negative(text: str) -> None:
    assert parse_postmaster_pid(text) is None


def test_postmaster_pid_first_line_only() -> None:
    parsed = parse_postmaster_pid("4242\n")
    assert parsed is not None
    assert (parsed.pid, parsed.data_dir, parsed.port) == (4242, None, None)


def test_postmaster_pid_half_written_data_dir_line() -> None:
    # "/pgdata/p" without its newline may be cut: not taken as the data directory.
    parsed = parse_postmaster_pid("4242\n/pgdata/p")
    assert parsed is not None
    assert parsed.data_dir is None


# --- argv -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "data_dir"),
    [
        (["postgres", "-D", "/pgdata/pg16"], "/pgdata/pg16"),
        (["postgres", "-D/pgdata/pg16"], "/pgdata/pg16"),
        (["postgres", "--data_directory=/pgdata/pg16"], "/pgdata/pg16"),
        (["postgres", "--data-directory=/pgdata/pg16"], "/pgdata/pg16"),
        (["postgres", "-c", "data_directory=/pgdata/pg16"], "/pgdata/pg16"),
        (["postgres", "-c", "port=5433", "-D", "rel/dir"], "rel/dir"),
        (
            ["postgres", "-D", "/pgdata/pg16", "--config-file=/pgdata/pg16/postgresql.conf"],
            "/pgdata/pg16",
        ),
        (["postgres"], None),
        (["postgres", "-D"], None),  # -D without its value
        (["postgres", "-c", "port=5432"], None),
        ([], None),
    ],
)
def test_data_dir_from_argv(argv: list[str], data_dir: str | None) -> None:
    assert data_dir_from_argv(argv) == data_dir


@pytest.mark.parametrize(
    ("argv", "server"),
    [
        (["postgres", "-D", "/pgdata/pg16"], True),
        (["postgres", "-C", "data_directory", "-D", "/pgdata/pg16"], False),
        (["postgres", "-Cshared_buffers", "-D", "/pgdata/pg16"], False),
        (["postgres", "--describe-config"], False),
        (["postgres", "--single", "-D", "/pgdata/pg16", "postgres"], False),
        (["postgres", "--boot", "-D", "/pgdata/pg16"], False),
        (["postgres", "--check", "-D", "/pgdata/pg16"], False),
        (["postgres", "-V"], False),
        (["postgres", "--version"], False),
        (["postgres", "--help"], False),
        (["/usr/lib/postgresql/15/bin/-C"], True),  # argv[0] is no option
    ],
)
def test_is_server_invocation(argv: list[str], server: bool) -> None:
    assert is_server_invocation(argv) is server


@pytest.mark.parametrize(
    ("exe", "name"),
    [
        ("/usr/lib/postgresql/15/bin/postgres", "postgres"),
        ("/usr/pgsql-16/bin/postgres (deleted)", "postgres"),  # upgraded under a running server
        ("/usr/bin/dash", "dash"),
        ("/tmp/postgres (deleted) (deleted)", "postgres (deleted)"),
    ],
)
def test_binary_name(exe: str, name: str) -> None:
    assert binary_name(exe) == name
