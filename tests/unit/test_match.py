"""watcher.match decides, from facts, who is a postmaster: every rejection and acceptance."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tests.unit.fakeproc import load
from watcher.errors import UsageError
from watcher.limits import DEFAULT_PATTERN
from watcher.match import (
    Facts,
    ProcInfo,
    Rule,
    confirm,
    fallback_postmasters,
    might_be_postmaster,
    role_of,
    validate_score,
)
from watcher.parse import PidFile, parse_cmdline, parse_postmaster_pid, parse_stat

PG = "/usr/lib/postgresql/15/bin/postgres"
DEFAULT_RULE = Rule(score=-900, pattern=re.compile(DEFAULT_PATTERN))


def argv_of(name: str) -> list[str]:
    return parse_cmdline(load(name).cmdline)


def postmaster_facts(**changes: object) -> Facts:
    """The captured postmaster, as identity.inspect reports it when all is well."""
    sample = load("postmaster")
    assert sample.pidfile is not None
    facts = Facts(
        stat=parse_stat(sample.stat),
        argv=parse_cmdline(sample.cmdline),
        uid=26,
        binary="postgres",
        data_dir=sample.data_dir,
        data_dir_uid=26,
        pidfile=parse_postmaster_pid(sample.pidfile),
        pidfile_state="ok",
    )
    return dataclasses.replace(facts, **changes)  # type: ignore[arg-type]


def stale_pidfile() -> PidFile:
    return PidFile(pid=31337, data_dir="/pgdata/pg", start_epoch=1, port=5432)


# --- might_be_postmaster: the cheap first look -------------------------------------------


def test_default_pattern_matches_the_captured_postmaster() -> None:
    assert might_be_postmaster(argv_of("postmaster"), [DEFAULT_RULE]) is DEFAULT_RULE


@pytest.mark.parametrize(
    "name", ["backend", "checkpointer", "named_backend", "named_walwriter", "kthreadd", "zombie"]
)
def test_children_kernel_threads_and_zombies_are_skipped(name: str) -> None:
    # A rule without a pattern would match anything named postgres: titles still skip.
    rules = [DEFAULT_RULE, Rule(score=0, data_dir="/pgdata/pg"), Rule(score=0)]
    assert might_be_postmaster(argv_of(name), rules) is None


def test_script_called_postgres_passes_the_first_look() -> None:
    # "/bin/sh /tmp/x/postgres -D /pgdata/pg16": the pattern matches; confirm() must reject.
    assert might_be_postmaster(argv_of("script_postgres"), [DEFAULT_RULE]) is DEFAULT_RULE


def test_rules_without_a_pattern_need_a_binary_called_postgres() -> None:
    by_dir = Rule(score=0, data_dir="/pgdata/pg16")
    assert might_be_postmaster(["postgres", "-D", "/x"], [by_dir]) is by_dir
    assert might_be_postmaster(["/usr/pgsql-16/bin/postmaster"], [by_dir]) is by_dir
    assert might_be_postmaster(["sleep", "-D", "/pgdata/pg16"], [by_dir]) is None
    assert might_be_postmaster([], [by_dir]) is None


def test_first_matching_rule_wins() -> None:
    a = Rule(score=-100, pattern=re.compile("-D /pgdata/a"))
    b = Rule(score=-200, pattern=re.compile("-D /pgdata/b"))
    assert might_be_postmaster(["postgres", "-D", "/pgdata/b"], [a, b]) is b
    assert might_be_postmaster(["postgres", "-D", "/pgdata/c"], [a, b]) is None


def test_rule_matches_and_names() -> None:
    by_dir = Rule(score=0, data_dir="/pgdata/pg16/")
    assert by_dir.matches("postgres", "/pgdata/pg16")
    assert not by_dir.matches("postgres", "/pgdata/pg15")
    assert not by_dir.matches("postgres", None)
    assert Rule(score=0).matches("anything", None)
    assert DEFAULT_RULE.name == f"pattern {DEFAULT_PATTERN!r}"
    assert by_dir.name == "data dir /pgdata/pg16/"
    assert Rule(score=0).name == "all postmasters"


# --- confirm: acceptance ------------------------------------------------------------------


def test_confirm_accepts_the_postmaster_named_by_its_pidfile() -> None:
    verdict = confirm(postmaster_facts())
    assert verdict.ok
    assert verdict.confirmed
    assert "postmaster.pid names it" in verdict.reason


def test_confirm_accepts_before_the_pidfile_is_written() -> None:
    verdict = confirm(postmaster_facts(pidfile=None, pidfile_state="missing"))
    assert verdict.ok
    assert not verdict.confirmed
    assert "not written yet" in verdict.reason


def test_confirm_accepts_a_stale_pidfile() -> None:
    # After kill -9 the old postmaster.pid stays until the new postmaster rewrites it.
    verdict = confirm(postmaster_facts(pidfile=stale_pidfile()))
    assert verdict.ok
    assert "stale postmaster.pid (pid 31337 gone)" in verdict.reason


def test_confirm_accepts_an_unreadable_pidfile() -> None:
    verdict = confirm(postmaster_facts(pidfile=None, pidfile_state="unreadable"))
    assert verdict.ok
    assert "unreadable" in verdict.reason


def test_confirm_accepts_postmaster_binary_name() -> None:
    assert confirm(postmaster_facts(binary="postmaster")).ok


def test_confirm_accepts_unreadable_exe_when_the_pidfile_names_it() -> None:
    verdict = confirm(postmaster_facts(binary=None))
    assert verdict.ok
    assert verdict.confirmed


# --- confirm: every rejection ------------------------------------------------------------


def test_confirm_rejects_a_renamed_sleep() -> None:
    verdict = confirm(postmaster_facts(binary="sleep"))
    assert not verdict.ok
    assert verdict.reason == "executable is sleep, not postgres"


def test_confirm_rejects_a_program_named_postgres_that_is_no_server() -> None:
    # A copy of sleep saved as postgres: right name, wrong content.
    verdict = confirm(postmaster_facts(binary_is_server=False))
    assert not verdict.ok
    assert verdict.reason == "executable postgres is not a PostgreSQL server binary"
    assert confirm(postmaster_facts(binary_is_server=None)).ok  # content unreadable: by name


@pytest.mark.parametrize("shell", ["dash", "bash", "python3.11", "python3"])
def test_confirm_rejects_a_script_called_postgres(shell: str) -> None:
    sample = load("script_postgres")
    facts = postmaster_facts(
        stat=parse_stat(sample.stat),  # comm is "postgres": the kernel names it after the script
        argv=parse_cmdline(sample.cmdline),
        binary=shell,
        pidfile=None,
        pidfile_state="missing",
    )
    verdict = confirm(facts)
    assert not verdict.ok
    assert verdict.reason == f"executable is {shell}, not postgres"


def test_confirm_rejects_another_uid_than_the_data_dir_owner() -> None:
    verdict = confirm(postmaster_facts(uid=65534, pidfile=None, pidfile_state="missing"))
    assert not verdict.ok
    assert "belongs to uid 26, the process runs as uid 65534" in verdict.reason


def test_confirm_rejects_another_uid_even_when_the_pidfile_names_it() -> None:
    # The owner check comes first: a pid file naming the process is no licence.
    assert not confirm(postmaster_facts(data_dir_uid=0)).ok


@pytest.mark.parametrize("name", ["backend", "named_backend", "checkpointer", "named_walwriter"])
def test_confirm_rejects_backends_and_aux(name: str) -> None:
    sample = load(name)
    verdict = confirm(postmaster_facts(stat=parse_stat(sample.stat), argv=argv_of(name)))
    assert not verdict.ok
    assert verdict.reason == "a backend or auxiliary process, not the postmaster"


@pytest.mark.parametrize(
    "argv",
    [
        [PG, "-C", "data_directory", "-D", "/pgdata/pg16"],
        [PG, "-D", "/pgdata/pg16", "-C", "shared_buffers"],
        [PG, "--single", "-D", "/pgdata/pg16"],
        [PG, "--check", "-D", "/pgdata/pg16"],
    ],
)
def test_confirm_rejects_one_shot_invocations(argv: list[str]) -> None:
    verdict = confirm(postmaster_facts(argv=argv, pidfile=stale_pidfile()))
    assert not verdict.ok
    assert verdict.reason == "a one-shot postgres invocation, not a server"


def test_confirm_rejects_when_the_pidfile_names_another_live_postgres() -> None:
    verdict = confirm(postmaster_facts(pidfile=stale_pidfile(), pidfile_names_live_postgres=True))
    assert not verdict.ok
    assert verdict.reason == "postmaster.pid names running postmaster 31337"


def test_confirm_unreadable_exe_requires_the_pidfile() -> None:
    missing = confirm(postmaster_facts(binary=None, pidfile=None, pidfile_state="missing"))
    assert not missing.ok
    assert missing.reason == "executable unreadable and postmaster.pid not written yet"
    stale = confirm(postmaster_facts(binary=None, pidfile=stale_pidfile()))
    assert not stale.ok
    assert stale.reason == "executable unreadable and postmaster.pid is stale"


def test_confirm_unreadable_exe_falls_back_to_comm() -> None:
    sample = load("hostile_paren")
    verdict = confirm(postmaster_facts(binary=None, stat=parse_stat(sample.stat)))
    assert not verdict.ok
    assert verdict.reason == "command is foo) Z 1 (bar, not postgres"


def test_confirm_rejects_zombies() -> None:
    stat = parse_stat(load("postmaster").stat)
    verdict = confirm(postmaster_facts(stat=dataclasses.replace(stat, state="Z")))
    assert (verdict.ok, verdict.reason) == (False, "zombie")


def test_confirm_rejects_without_a_data_dir() -> None:
    verdict = confirm(postmaster_facts(data_dir=None, data_dir_uid=None, pidfile=None))
    assert not verdict.ok
    assert verdict.reason.startswith("no data directory")


def test_confirm_rejects_an_unstatable_data_dir() -> None:
    verdict = confirm(postmaster_facts(data_dir_uid=None))
    assert not verdict.ok
    assert verdict.reason.startswith("cannot stat data directory")


# --- the fallbacks: the parent of postgres processes, the only postgres process -----------


def procinfo(name: str) -> ProcInfo:
    stat = parse_stat(load(name).stat)
    return ProcInfo(stat.pid, stat.ppid, stat.comm, argv_of(name))


def test_fallback_b_parent_of_postgres_processes() -> None:
    procs = [procinfo(n) for n in ("postmaster", "checkpointer", "walwriter", "backend")]
    found, method = fallback_postmasters(procs)
    assert [p.pid for p in found] == [load("postmaster").pid]
    assert method == "parent of postgres processes"


def test_fallback_b_two_clusters() -> None:
    names = ("postmaster", "backend", "named_postmaster", "named_checkpointer", "kthreadd")
    found, method = fallback_postmasters([procinfo(n) for n in names])
    assert sorted(p.pid for p in found) == sorted(
        [load("postmaster").pid, load("named_postmaster").pid]
    )
    assert method == "parent of postgres processes"


def test_fallback_b_excludes_children_of_postgres_and_rewritten_titles() -> None:
    pm = procinfo("postmaster")
    backend = procinfo("backend")
    # A parallel worker forked by a backend: the backend is a parent of a postgres process,
    # but it is itself a child of one and wears a title.
    worker = ProcInfo(99999, backend.pid, "postgres", ["postgres: parallel worker for PID 1"])
    found, _ = fallback_postmasters([pm, backend, worker])
    assert [p.pid for p in found] == [pm.pid]
    orphan_title = ProcInfo(5, 1, "postgres", ["postgres: checkpointer "])
    kid = ProcInfo(6, 5, "postgres", ["postgres: walwriter "])
    assert fallback_postmasters([orphan_title, kid]) == ([], "")


def test_fallback_c_the_only_postgres_process() -> None:
    pm = procinfo("postmaster")
    found, method = fallback_postmasters([pm, procinfo("kthreadd"), procinfo("zombie")])
    assert (found, method) == ([pm], "the only postgres process")


def test_fallback_none() -> None:
    assert fallback_postmasters([]) == ([], "")
    assert fallback_postmasters([procinfo("kthreadd"), procinfo("hostile_paren")]) == ([], "")
    # Two unrelated postgres processes, neither a parent: nothing to guess from.
    a = ProcInfo(10, 1, "postgres", ["postgres", "-D", "/a"])
    b = ProcInfo(11, 1, "postgres", ["postgres", "-D", "/b"])
    assert fallback_postmasters([a, b]) == ([], "")


# --- roles ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("postmaster", "other"),
        ("named_postmaster", "other"),
        ("backend", "backend"),
        ("named_backend", "backend"),
        ("checkpointer", "aux"),
        ("named_checkpointer", "aux"),
        ("walwriter", "aux"),
        ("named_walwriter", "aux"),
        ("autovacuum_launcher", "aux"),
        ("named_autovacuum_launcher", "aux"),
        ("kthreadd", "other"),
    ],
)
def test_role_of_captured_titles(name: str, role: str) -> None:
    assert role_of(argv_of(name), is_postmaster=False) == role


@pytest.mark.parametrize(
    ("title", "role"),
    [
        ("postgres: background writer ", "aux"),
        ("postgres: logical replication launcher ", "aux"),
        ("postgres: archiver last was 000000010000000000000001", "aux"),
        ("postgres: startup recovering 000000010000000000000002", "aux"),
        ("postgres: walreceiver streaming 0/3000148", "aux"),
        ("postgres: autovacuum worker postgres", "aux"),
        ("postgres: pg16: parallel worker for PID 4242 ", "aux"),
        ("postgres: pg16: app appdb 10.0.0.7(51234) idle", "backend"),
        ("postgres: postgres postgres [local] idle in transaction", "backend"),
        # a cluster named like an aux process: the part after it decides
        ("postgres: walwriter: postgres postgres [local] idle", "backend"),
        ("postmaster: checkpointer ", "aux"),
    ],
)
def test_role_of_titles(title: str, role: str) -> None:
    assert role_of([title], is_postmaster=False) == role


def test_role_of_postmaster() -> None:
    assert role_of(argv_of("postmaster"), is_postmaster=True) == "postmaster"


def test_validate_score() -> None:
    assert validate_score(-1000) == -1000
    assert validate_score(1000) == 1000
    with pytest.raises(UsageError, match=r"--score 1001 is out of range"):
        validate_score(1001)
    with pytest.raises(UsageError, match=r"--children-score -1001"):
        validate_score(-1001, "--children-score")


@pytest.mark.parametrize("cluster", ["startup-db", "archiver2", "walwriters"])
def test_role_of_cluster_named_like_an_aux_process(cluster: str) -> None:
    assert role_of([f"postgres: {cluster}: app app [local] idle"], False) == "backend"
    assert role_of([f"postgres: {cluster}: checkpointer "], False) == "aux"
