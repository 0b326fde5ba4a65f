"""The OOM harness's pure parts: the kernel's OOM lines, the report built from run records,
the cgroup helpers that only read text, and the small parsers in scenarios.py.

Kernel fixtures are real: captured from /dev/kmsg (Linux 6.18, cgroup v1, PostgreSQL 15) during
`bash scripts/oom-harness.sh --mode short`, trimmed to a few task-dump rows. Hand-written lines
follow the kernel's printk formats (mm/oom_kill.c) and say so.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from scripts.oomharness import cgroup, kmsg, report
from scripts.oomharness.scenarios import (
    BIG_QUERY,
    GUARDED,
    HOG,
    MANY_BACKENDS,
    PROTECTED,
    UNPROTECTED,
    Config,
    Group,
    RunResult,
    StormCycle,
    Victim,
    describe,
    failure_text,
    guard_actions,
    watcher_latency_us,
)

MEMCG = "/pgoom-harness-a9fae597"
HEADER = (
    "[  pid  ]   uid  tgid total_vm      rss rss_anon rss_file rss_shmem pgtables_bytes "
    "swapents oom_score_adj name"
)


def _constraint(pid: int, memcg: str = MEMCG, task: str = "postgres") -> str:
    return (
        "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,"
        f"oom_memcg={memcg},task_memcg={memcg},task={task},pid={pid},uid=26"
    )


# Protected non-postgres-hog run: the postmaster at 0 (pgoom), children and hog at 1000.
HOG_OOM = [
    "python3 invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=1000",
    "CPU: 1 UID: 26 PID: 2758 Comm: python3 Not tainted 6.18.44-fc-v782 #1 PREEMPT(none) ",
    "memory: usage 307200kB, limit 307200kB, failcnt 0",
    f"Memory cgroup stats for {MEMCG}:",
    "total_unevictable 0",
    "Tasks state (memory values in pages):",
    HEADER,
    "[   2721]    26  2721    23315     5494      544     4022       928   143360        0"
    "             0 postgres",
    "[   2723]    26  2723    23315     1594      579      943        72   122880        0"
    "          1000 postgres",
    "[   2739]    26  2739    24906     4464     1887     1935       642   143360        0"
    "          1000 postgres",
    "[   2758]    26  2758    62084    60236    59040     1196         0   532480        0"
    "          1000 python3",
    _constraint(2758, task="python3"),
    "Memory cgroup out of memory: Killed process 2758 (python3) total-vm:248336kB, "
    "anon-rss:236160kB, file-rss:4784kB, shmem-rss:0kB, UID:26 pgtables:520kB "
    "oom_score_adj:1000",
]

# Unprotected many-backends run: three OOMs in a row, the postmaster (2137) first.
KILLED_2137 = (
    "Memory cgroup out of memory: Killed process 2137 (postgres) total-vm:93260kB, "
    "anon-rss:2304kB, file-rss:16124kB, shmem-rss:3712kB, UID:26 pgtables:152kB "
    "oom_score_adj:1000"
)
KILLED_2201 = (
    "Memory cgroup out of memory: Killed process 2201 (postgres) total-vm:99628kB, "
    "anon-rss:7548kB, file-rss:8168kB, shmem-rss:2680kB, UID:26 pgtables:152kB "
    "oom_score_adj:1000"
)
KILLED_2217 = (
    "Memory cgroup out of memory: Killed process 2217 (postgres) total-vm:99628kB, "
    "anon-rss:7548kB, file-rss:8168kB, shmem-rss:2668kB, UID:26 pgtables:152kB "
    "oom_score_adj:1000"
)
BASELINE_OOMS = [
    "Tasks state (memory values in pages):",
    HEADER,
    "[   2137]    26  2137    23315     5535      576     4031       928   155648        0"
    "          1000 postgres",
    "[   2139]    26  2139    23315     1480      577      832        71   143360        0"
    "          1000 postgres",
    "[   2201]    26  2201    24907     4552     1887     1995       670   155648        0"
    "          1000 postgres",
    _constraint(2137),
    KILLED_2137,
    "Tasks state (memory values in pages):",
    HEADER,
    "[   2139]    26  2139    23315     1591      577      896       118   143360        0"
    "          1000 postgres",
    "[   2261]    26  2261    24940     4455     1826     1963       666   155648        0"
    "          1000 postgres",
    _constraint(2201),
    KILLED_2201,
    "Tasks state (memory values in pages):",
    HEADER,
    "[   2142]    26  2142    23315     1581      577      927        77   139264        0"
    "          1000 postgres",
    _constraint(2217),
    KILLED_2217,
]

# Another harness's group on the same host, minutes earlier (captured as well).
FOREIGN_OOM = [
    "Tasks state (memory values in pages):",
    HEADER,
    "[  29070]    26 29070    23315     5523      576     4019       928   147456        0"
    "             0 postgres",
    "[  29184]    26 29184    24907     4466     1887     1932       647   147456        0"
    "          1000 postgres",
    _constraint(29086, memcg="/pgoom-harness-f491f63c"),
    "Memory cgroup out of memory: Killed process 29086 (postgres) total-vm:99624kB, "
    "anon-rss:7544kB, file-rss:7740kB, shmem-rss:2624kB, UID:26 pgtables:144kB "
    "oom_score_adj:1000",
]


# --- kmsg.parse ---------------------------------------------------------------------------


def test_parse_captured_hog_oom() -> None:
    parsed = kmsg.parse(HOG_OOM, MEMCG)
    assert [(k.pid, k.comm, k.oom_score_adj) for k in parsed.kills] == [(2758, "python3", 1000)]
    assert parsed.kills[0].line == HOG_OOM[-1]
    assert parsed.tasks == {
        2721: {"rss_pages": 5494, "oom_score_adj": 0, "name": "postgres"},
        2723: {"rss_pages": 1594, "oom_score_adj": 1000, "name": "postgres"},
        2739: {"rss_pages": 4464, "oom_score_adj": 1000, "name": "postgres"},
        2758: {"rss_pages": 60236, "oom_score_adj": 1000, "name": "python3"},
    }
    # Only the two lines that name the kill: the report quotes them.
    assert parsed.lines == HOG_OOM[-2:]


def test_parse_three_ooms_keeps_kill_order_and_the_first_dump() -> None:
    parsed = kmsg.parse(BASELINE_OOMS, MEMCG)
    assert [k.pid for k in parsed.kills] == [2137, 2201, 2217]
    # The first dump is the state that decided the first kill: later dumps (without the
    # dead postmaster, with other sizes) must not overwrite or extend it.
    assert sorted(parsed.tasks) == [2137, 2139, 2201]
    assert parsed.tasks[2139]["rss_pages"] == 1480
    assert parsed.lines == [
        _constraint(2137),
        KILLED_2137,
        _constraint(2201),
        KILLED_2201,
        _constraint(2217),
        KILLED_2217,
    ]


def test_parse_ignores_another_groups_oom() -> None:
    parsed = kmsg.parse(FOREIGN_OOM + HOG_OOM, MEMCG)
    assert [k.pid for k in parsed.kills] == [2758]
    assert 29070 not in parsed.tasks
    assert 29184 not in parsed.tasks
    assert all("f491f63c" not in line for line in parsed.lines)


def test_parse_other_group_kill_counts_when_its_pid_is_named() -> None:
    parsed = kmsg.parse(FOREIGN_OOM, MEMCG, pids={29086})
    assert [k.pid for k in parsed.kills] == [29086]
    # ... but its task dump is not this group's.
    assert parsed.tasks == {}
    assert kmsg.parse(FOREIGN_OOM, MEMCG, pids={1}).kills == []


def test_parse_group_membership_is_exact_not_a_prefix() -> None:
    nested = [_constraint(7, memcg=MEMCG + "/child"), KILLED_2137]
    assert kmsg.parse(nested, MEMCG).kills == []
    assert [k.pid for k in kmsg.parse(nested, MEMCG + "/child").kills] == [2137]


def _killed(pid: int, adj: int) -> str:
    return (
        f"Memory cgroup out of memory: Killed process {pid} (postgres) total-vm:93256kB, "
        f"anon-rss:2308kB, file-rss:15956kB, shmem-rss:3764kB, UID:26 pgtables:144kB "
        f"oom_score_adj:{adj}"
    )


# memory.oom.group=1 on cgroup v2 (the VM test, Linux 6.1): the chosen backend, then every
# other task of the group, the postmaster at -900 included, and the chosen one once more.
GROUP_KILL = [
    _constraint(643, memcg="/pgoom-harness-6a44cc47"),
    _killed(643, 0),
    "Tasks in /pgoom-harness-6a44cc47 are going to be killed due to memory.oom.group set",
    _killed(627, -900),
    _killed(629, 0),
    _killed(643, 0),
]


def test_parse_group_kill_counts_every_member() -> None:
    parsed = kmsg.parse(GROUP_KILL, "/pgoom-harness-6a44cc47")
    assert [(k.pid, k.oom_score_adj) for k in parsed.kills] == [
        (643, 0), (627, -900), (629, 0), (643, 0)
    ]  # fmt: skip
    assert kmsg.parse(GROUP_KILL, MEMCG).kills == []


def test_parse_group_kill_of_another_group_is_not_ours() -> None:
    foreign = [line.replace("6a44cc47", "0ther000") for line in GROUP_KILL]
    assert kmsg.parse(foreign, "/pgoom-harness-6a44cc47").kills == []


def test_parse_global_oom_counts_only_named_pids() -> None:
    # Written from mm/oom_kill.c: a global OOM has no oom_memcg= field and another prefix.
    lines = [
        "oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,"
        f"global_oom,task_memcg={MEMCG},task=postgres,pid=4242,uid=26",
        "Out of memory: Killed process 4242 (postgres) total-vm:99628kB, anon-rss:7548kB, "
        "file-rss:8168kB, shmem-rss:2668kB, UID:26 pgtables:152kB oom_score_adj:1000",
    ]
    assert kmsg.parse(lines, MEMCG).kills == []
    assert [k.pid for k in kmsg.parse(lines, MEMCG, pids={4242}).kills] == [4242]


def test_parse_a_kill_closes_the_group() -> None:
    # After this group's kill, a later "Killed process" with no constraint line of its own
    # belongs to nobody known.
    lines = [_constraint(2137), KILLED_2137, KILLED_2201]
    assert [k.pid for k in kmsg.parse(lines, MEMCG).kills] == [2137]


def test_parse_lines_that_only_look_related() -> None:
    lines = [
        # Written from mm/oom_kill.c (oom_reap_task_mm) and the invoker line captured above.
        "oom_reaper: reaped process 2137 (postgres), now anon-rss:0kB, file-rss:0kB, shmem-rss:0kB",
        "postgres invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=1000",
        f"Memory cgroup stats for {MEMCG}:",
        "Tasks state (memory values in pages):",
        "",
    ]
    parsed = kmsg.parse(lines, MEMCG, pids={2137})
    assert parsed.kills == []
    assert parsed.tasks == {}
    assert parsed.lines == []


def test_parse_empty() -> None:
    parsed = kmsg.parse([], MEMCG)
    assert (parsed.kills, parsed.tasks, parsed.lines) == ([], {}, [])


def test_parse_older_task_dump_columns() -> None:
    # Linux 4.15 - 5.x print fewer columns (no rss_anon/rss_file/rss_shmem): the header
    # names them, so the row is read by name, not position.
    lines = [
        "[  pid  ]   uid  tgid total_vm      rss pgtables_bytes swapents oom_score_adj name",
        "[    812]    26   812    23315     5494   143360        0          -900 postgres",
        _constraint(812),
    ]
    assert kmsg.parse(lines, MEMCG).tasks == {
        812: {"rss_pages": 5494, "oom_score_adj": -900, "name": "postgres"}
    }


def test_parse_negative_score_in_the_kill_line() -> None:
    line = KILLED_2137.replace("oom_score_adj:1000", "oom_score_adj:-900")
    kill = kmsg.parse([_constraint(2137), line], MEMCG).kills[0]
    assert kill.oom_score_adj == -900


def test_parse_rows_without_a_header_are_ignored() -> None:
    row = HOG_OOM[7]
    assert kmsg.parse([row, _constraint(2721), KILLED_2137], MEMCG).tasks == {}


def test_parse_rows_after_the_constraint_line_are_not_a_dump() -> None:
    # A header is good for one dump: the constraint line ends it.
    lines = [HEADER, _constraint(2137), KILLED_2137, HOG_OOM[7], _constraint(2201), KILLED_2201]
    assert kmsg.parse(lines, MEMCG).tasks == {}


@pytest.mark.parametrize(
    "row",
    [
        # truncated (a record cut short)
        "[   2723]    26  2723    23315     1594      579      943",
        # garbage in a number column: skipped, not a ValueError out of the harness
        "[   2723]    26  2723    23315     15x4      579      943        72   122880        0"
        "          1000 postgres",
        "[   2723]    26  2723    23315     1594      579      943        72   122880        0"
        "          high postgres",
    ],
)
def test_parse_malformed_rows_are_skipped(row: str) -> None:
    lines = [HEADER, row, HOG_OOM[7], _constraint(2721)]
    parsed = kmsg.parse(lines, MEMCG)
    assert sorted(parsed.tasks) == [2721]


def test_parse_malformed_kill_lines_are_not_kills() -> None:
    lines = [
        _constraint(2137),
        # cut before oom_score_adj
        "Memory cgroup out of memory: Killed process 2137 (postgres) total-vm:93260kB, anon-rss:",
        "Memory cgroup out of memory: Killed process (postgres) oom_score_adj:1000",
        "Memory cgroup out of memory: Killed process 2137 (postgres) oom_score_adj:",
    ]
    assert kmsg.parse(lines, MEMCG).kills == []


def test_parse_hostile_command_names() -> None:
    # comm is whatever the process wrote to /proc/self/comm (15 bytes): parentheses and
    # spaces included.
    killed = KILLED_2137.replace("(postgres)", "(foo) Z (x)")
    dump = [
        HEADER,
        "[   2137]    26  2137    23315     5535      576     4031       928   155648        0"
        "          1000 Web Content",
    ]
    parsed = kmsg.parse([*dump, _constraint(2137), killed], MEMCG)
    assert [(k.pid, k.comm, k.oom_score_adj) for k in parsed.kills] == [(2137, "foo) Z (x", 1000)]
    assert parsed.tasks[2137]["name"] == "Web Content"
    assert parsed.tasks[2137]["rss_pages"] == 5535


def test_kernel_log_without_a_device_reads_nothing() -> None:
    log = kmsg.KernelLog.__new__(kmsg.KernelLog)
    log.fd = None
    assert not log.available
    assert log.read() == []
    log.close()  # idempotent without an fd
    assert log.fd is None


# --- report: building blocks --------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "text"),
    [
        ([], "-"),
        ([0.084], "0.08 s"),
        ([0.084, 0.078], "median 0.08 s, max 0.08 s"),
        ([0.1, 0.3], "median 0.20 s, max 0.30 s"),
        ([0.05, 1.0, 0.07], "median 0.07 s, max 1.00 s"),
    ],
)
def test_seconds(values: list[float], text: str) -> None:
    assert report._seconds(values) == text


def _run(
    scenario: str,
    mode: str,
    index: int,
    *,
    survived: bool = True,
    recovery_s: float | None = 0.08,
    victims: tuple[Victim, ...] = (),
    expected: int = 10_000,
    counted: int | None = 10_000,
    oom_kills: int = 1,
    refused: str = "",
    problems: tuple[str, ...] = (),
) -> RunResult:
    run = RunResult(scenario, mode, index)
    run.postmaster_survived = survived
    run.recovery_s = recovery_s if survived else None
    run.victims = list(victims)
    run.rows_expected = expected
    run.rows_counted = counted
    run.oom_kills = oom_kills
    run.refused = refused
    run.problems = list(problems)
    return run


BACKEND = Victim(2352, "postgres", "backend", 1000)
POSTMASTER = Victim(2137, "postgres", "postmaster", 1000)
HOG_VICTIM = Victim(2758, "python3", "hog", 1000)
REFUSED = "connection to server on socket failed: Connection refused"


def test_rows_lost_counts_and_not_counted() -> None:
    group = Group(MANY_BACKENDS, PROTECTED)
    group.runs = [_run(MANY_BACKENDS, PROTECTED, 1)]
    assert report._rows_lost(group) == "0"
    group.runs.append(_run(MANY_BACKENDS, PROTECTED, 2, expected=20_000, counted=None))
    assert report._rows_lost(group) == "not counted"


def test_rows_lost_are_cumulative_within_a_group() -> None:
    # The runs of a group share one table: each run's count covers the earlier runs' rows,
    # so 5 rows lost in run 1 show up again in run 2's count. The group lost 5, not 10.
    group = Group(MANY_BACKENDS, PROTECTED)
    group.runs = [
        _run(MANY_BACKENDS, PROTECTED, 1, expected=10_000, counted=9_995),
        _run(MANY_BACKENDS, PROTECTED, 2, expected=20_000, counted=19_995),
    ]
    assert report._rows_lost(group) == "5"
    group.runs.append(_run(MANY_BACKENDS, PROTECTED, 3, expected=30_000, counted=29_990))
    assert report._rows_lost(group) == "10"


def test_victims_counted_in_order_of_first_kill() -> None:
    group = Group(MANY_BACKENDS, UNPROTECTED)
    group.runs = [
        _run(MANY_BACKENDS, UNPROTECTED, 1, victims=(POSTMASTER, BACKEND, BACKEND)),
        _run(MANY_BACKENDS, UNPROTECTED, 2, victims=(BACKEND,)),
    ]
    assert report._victims(group) == (
        "postmaster (postgres, adj 1000) x1, backend (postgres, adj 1000) x3"
    )
    assert report._victims(Group(HOG, PROTECTED)) == "none"


def test_recovery_mixes_times_and_deaths() -> None:
    group = Group(MANY_BACKENDS, UNPROTECTED)
    group.runs = [
        _run(MANY_BACKENDS, UNPROTECTED, 1, recovery_s=0.05),
        _run(MANY_BACKENDS, UNPROTECTED, 2, survived=False, refused=""),
        _run(MANY_BACKENDS, UNPROTECTED, 3, survived=False, refused="x" * 100),
    ]
    text = report._recovery(group)
    assert text.startswith("0.05 s; 2x never: connections refused until restarted by hand")
    # The first refusal text that was recorded, cut to 70 characters.
    assert text.endswith(f"(`{'x' * 70}`)")
    assert report._recovery(Group(BIG_QUERY, PROTECTED)) == "-"


def test_recovery_of_a_run_that_survived_without_a_time() -> None:
    group = Group(BIG_QUERY, PROTECTED)
    group.runs = [_run(BIG_QUERY, PROTECTED, 1, recovery_s=None)]
    assert report._recovery(group) == "-"


# --- report: the table, from the records of a real short run -------------------------------


def _captured_short_run() -> tuple[list[Group], tuple[Group, list[StormCycle]]]:
    """Records like those of the short run this file's kernel lines come from (three of its
    groups, a shorter storm), rebuilt by hand; the expected rows are that run's table's."""
    baseline = Group(MANY_BACKENDS, UNPROTECTED)
    baseline.runs = [
        _run(
            MANY_BACKENDS,
            UNPROTECTED,
            1,
            survived=False,
            victims=(POSTMASTER, BACKEND, BACKEND),
            oom_kills=3,
            refused=REFUSED,
        )
    ]
    protected = Group(MANY_BACKENDS, PROTECTED)
    protected.runs = [
        _run(MANY_BACKENDS, PROTECTED, 1, recovery_s=0.084, victims=(BACKEND,)),
        _run(
            MANY_BACKENDS,
            PROTECTED,
            2,
            recovery_s=0.078,
            victims=(BACKEND,),
            expected=20_000,
            counted=20_000,
        ),
    ]
    protected.verify_codes = [0]
    hog = Group(HOG, PROTECTED)
    hog.runs = [
        _run(HOG, PROTECTED, 1, recovery_s=0.043, victims=(HOG_VICTIM,)),
        _run(
            HOG,
            PROTECTED,
            2,
            recovery_s=0.071,
            victims=(HOG_VICTIM,),
            expected=20_000,
            counted=20_000,
        ),
    ]
    storm_group = Group("restart-storm", PROTECTED)
    cycles = [
        StormCycle(1, "kill -9 + start", 2813, 883, 0.05, 12.0, True),
        StormCycle(2, "pg_ctl restart", 2828, 593, 0.1, None, True),
        StormCycle(3, "kill -9 + start", 2838, 3450, None, 14.0, True),
    ]
    return [baseline, protected, hog], (storm_group, cycles)


def test_markdown_table_matches_the_captured_report() -> None:
    groups, storm = _captured_short_run()
    text = report.markdown(groups, storm, "OOM harness, short mode")
    lines = text.splitlines()
    assert lines[0] == "OOM harness, short mode"
    assert lines[2] == (
        "| scenario | mode | runs | postmaster survived | victims | rows lost | recovery time "
        "| sessions lost | crash restarts | guard |"
    )
    assert lines[4:] == [
        "| many-backends | unprotected | 1 | 0/1 | postmaster (postgres, adj 1000) x1, "
        "backend (postgres, adj 1000) x2 | 0 | 1x never: connections refused until restarted "
        f"by hand (`{REFUSED}`) | - | - | - |",
        "| many-backends | protected | 2 | 2/2 | backend (postgres, adj 1000) x2 | 0 | "
        "median 0.08 s, max 0.08 s | - | - | - |",
        "| non-postgres-hog | protected | 2 | 2/2 | hog (python3, adj 1000) x2 | 0 | "
        "median 0.06 s, max 0.07 s | - | - | - |",
        "| restart storm | protected | 3 cycles | 3/3 new postmasters protected | - | - | "
        "worst protection latency 3450 µs (pgoom: exec → written); 0.1 ms seen unprotected "
        "| - | - | - |",
    ]
    assert text.endswith("\n")


def test_markdown_counts_unprotected_storm_cycles_and_missing_latencies() -> None:
    storm_group = Group("restart-storm", PROTECTED)
    cycles = [
        StormCycle(1, "kill -9 + start", 10, None, None, None, False),
        StormCycle(2, "pg_ctl restart", 11, 700, 2.25, None, True),
    ]
    text = report.markdown([], (storm_group, cycles), "h")
    row = text.splitlines()[-1]
    assert "| 2 cycles | 1/2 new postmasters protected |" in row
    assert "worst protection latency 700 µs" in row
    assert "2.2 ms seen unprotected" in row


def test_markdown_without_storm_or_runs() -> None:
    empty = Group(BIG_QUERY, PROTECTED, problems=["aborted"])
    lines = report.markdown([empty], None, "h").splitlines()
    assert len(lines) == 5
    # No run counted anything: no figure rather than a reassuring 0.
    assert lines[-1] == "| big-query | protected | 0 | 0/0 | none | - | - | - | - | - |"


def test_details_quote_evidence_and_problems() -> None:
    groups, storm = _captured_short_run()
    first = groups[1].runs[0]
    first.scores = {"postmaster": {0: 1}, "backend": {1000: 44}}
    first.rss_mb = {"postmaster": 21.7, "backend": 18.5}
    first.postmaster_adj_at_oom = 0
    first.kernel_lines = [_constraint(2352)]
    first.notes = ["55 sessions fit: pushed with one large allocation"]
    groups[1].runs[1].problems = ["kernel log had fewer kills than the oom_kill counter"]
    groups[1].start_protect_ms = [36.04]
    empty = Group(BIG_QUERY, UNPROTECTED)
    text = report.details([*groups, empty], storm)
    assert "**many-backends / protected** (run 1 of 2)" in text
    assert "backend: 1000 x 44; postmaster: 0 x 1" in text
    assert "largest RSS per role, same source: backend 18.5 MiB, postmaster 21.7 MiB" in text
    assert "postmaster's oom_score_adj in the kernel's task dump: 0" in text
    assert "cluster start → postmaster at target score: 36.0 ms" in text
    assert f"- kernel: `{_constraint(2352)}`" in text
    assert "- note: 55 sessions fit" in text
    assert "- PROBLEM: kernel log had fewer kills than the oom_kill counter" in text
    # A group without runs has no evidence to show.
    assert "big-query / unprotected" not in text
    assert "**restart storm** (kill -9 + start x2, pg_ctl restart x1)" in text
    assert "median 883 µs, max 3450 µs over 3 cycles" in text
    assert "median 13.0 ms, max 14.0 ms" in text


# --- report: the verdict ----------------------------------------------------------------------


def test_verdict_of_the_captured_run_passes_with_no_warnings() -> None:
    groups, storm = _captured_short_run()
    assert report.verdict(groups, storm, Config()) == ([], [])


def test_verdict_names_each_failure() -> None:
    group = Group(MANY_BACKENDS, PROTECTED)
    group.runs = [
        _run(MANY_BACKENDS, PROTECTED, 1, survived=False),
        _run(MANY_BACKENDS, PROTECTED, 2, recovery_s=2.5),
        _run(MANY_BACKENDS, PROTECTED, 3, oom_kills=0, counted=None),
        _run(MANY_BACKENDS, PROTECTED, 4, expected=40_000, counted=39_000, problems=("p",)),
    ]
    group.verify_codes = [0, 1]
    storm_group = Group("restart-storm", PROTECTED, problems=["aborted"])
    cycles = [StormCycle(7, "pg_ctl restart", 99, None, None, None, False)]
    failures, warnings = report.verdict([group], (storm_group, cycles), Config())
    assert failures == [
        "many-backends/protected #1: the postmaster was killed",
        "many-backends/protected #2: connections not accepted within 2.0 s (took 2.5)",
        "many-backends/protected #3: no OOM kill happened (nothing was tested)",
        "many-backends/protected #3: committed rows not counted",
        "many-backends/protected #4: 1000 committed rows lost",
        "many-backends/protected #4: p",
        "many-backends/protected: pgoom verify exit codes [0, 1]",
        "restart-storm: aborted",
        "restart-storm #7 (pg_ctl restart): postmaster 99 not protected",
    ]
    assert warnings == []


def test_verdict_recovery_limit_is_inclusive() -> None:
    group = Group(BIG_QUERY, PROTECTED)
    group.runs = [_run(BIG_QUERY, PROTECTED, 1, recovery_s=2.0)]
    assert report.verdict([group], None, Config(recovery_limit_s=2.0)) == ([], [])
    assert report.verdict([group], None, Config(recovery_limit_s=1.5))[0] != []


def test_verdict_baseline_problems_are_warnings() -> None:
    group = Group(MANY_BACKENDS, UNPROTECTED)
    run = _run(MANY_BACKENDS, UNPROTECTED, 1, problems=("slow",))
    run.baseline_resets = 2
    group.runs = [run]
    failures, warnings = report.verdict([group], None, Config())
    assert failures == []
    assert warnings[0] == "many-backends/unprotected #1: slow"
    assert "lowered the unprotected postmaster's score 2x" in warnings[1]
    # Every baseline postmaster survived: the scenario did not reproduce the problem.
    assert "the baseline did not reproduce" in warnings[2]
    assert len(warnings) == 3


def test_verdict_baseline_killed_postmaster_is_expected() -> None:
    groups, _ = _captured_short_run()
    assert report.verdict(groups[:1], None, Config()) == ([], [])


# --- report: JSON and chart ---------------------------------------------------------------


def test_to_json_round_trips_the_records() -> None:
    groups, storm = _captured_short_run()
    doc = json.loads(report.to_json(groups, storm, Config(), {"mode": "short", "cpus": 2}))
    assert doc["meta"] == {"mode": "short", "cpus": 2}
    assert doc["config"]["recovery_limit_s"] == 2.0
    assert [(g["scenario"], g["mode"]) for g in doc["groups"]] == [
        (MANY_BACKENDS, UNPROTECTED),
        (MANY_BACKENDS, PROTECTED),
        (HOG, PROTECTED),
    ]
    first = doc["groups"][0]["runs"][0]
    assert first["victims"][0] == {
        "pid": 2137,
        "name": "postgres",
        "role": "postmaster",
        "oom_score_adj": 1000,
    }
    assert first["refused"] == REFUSED
    assert [c["watcher_latency_us"] for c in doc["storm"]["cycles"]] == [883, 593, 3450]
    assert json.loads(report.to_json([], None, Config(), {}))["storm"] is None


def test_chart_writes_a_png_or_says_why_not(tmp_path: Path) -> None:
    groups, storm = _captured_short_run()
    groups[1].start_protect_ms = [36.0]
    path = tmp_path / "chart.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert report.chart(groups, storm, str(path)) == "matplotlib is not installed: no chart"
        assert not path.exists()
        return
    assert report.chart(groups, storm, str(path)) is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- cgroup: detection and counters on fake trees -------------------------------------------


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    v1 = tmp_path / "memory"
    v2 = tmp_path / "unified"
    v1.mkdir()
    v2.mkdir()
    monkeypatch.setattr(cgroup, "V1_ROOT", str(v1))
    monkeypatch.setattr(cgroup, "V2_ROOT", str(v2))
    return v1, v2


def test_detect_prefers_v1_memory_controller(roots: tuple[Path, Path]) -> None:
    v1, v2 = roots
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (v2 / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert cgroup.detect() == (1, str(v1))


def test_detect_v2_with_memory_delegated(roots: tuple[Path, Path]) -> None:
    _, v2 = roots
    (v2 / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (v2 / "cgroup.subtree_control").write_text("cpu memory pids\n")
    assert cgroup.detect() == (2, str(v2))
    assert (v2 / "cgroup.subtree_control").read_text() == "cpu memory pids\n"


def test_detect_v2_enables_memory_for_children(roots: tuple[Path, Path]) -> None:
    _, v2 = roots
    (v2 / "cgroup.controllers").write_text("cpu io memory pids\n")
    (v2 / "cgroup.subtree_control").write_text("\n")
    assert cgroup.detect() == (2, str(v2))
    assert (v2 / "cgroup.subtree_control").read_text() == "+memory"


@pytest.mark.parametrize("controllers", [None, "cpu io pids\n", "memory_recursiveprot\n"])
def test_detect_without_a_memory_controller(
    roots: tuple[Path, Path], controllers: str | None
) -> None:
    _, v2 = roots
    if controllers is not None:
        (v2 / "cgroup.controllers").write_text(controllers)
    with pytest.raises(cgroup.CgroupError, match="no memory cgroup controller"):
        cgroup.detect()


def _group_at(path: Path, version: int) -> cgroup.MemoryCgroup:
    """A MemoryCgroup over a plain directory: __init__ would mkdir in the real hierarchy."""
    group = cgroup.MemoryCgroup.__new__(cgroup.MemoryCgroup)
    group.version = version
    group.name = path.name
    group.path = str(path)
    group.limit_bytes = 300 << 20
    return group


def test_oom_kills_from_v1_oom_control(tmp_path: Path) -> None:
    group = _group_at(tmp_path, 1)
    # Captured from /sys/fs/cgroup/memory/memory.oom_control (Linux 6.18), count changed.
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert group.oom_kills() == 3


def test_oom_kills_from_v2_events_reads_oom_kill_not_oom(tmp_path: Path) -> None:
    group = _group_at(tmp_path, 2)
    # memory.events as Linux 6.x writes it: "oom" (OOM situations) precedes "oom_kill".
    (tmp_path / "memory.events").write_text(
        "low 0\nhigh 0\nmax 418\noom 7\noom_kill 2\noom_group_kill 0\n"
    )
    assert group.oom_kills() == 2


def test_oom_kills_without_the_counter(tmp_path: Path) -> None:
    group = _group_at(tmp_path, 1)
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")
    with pytest.raises(cgroup.CgroupError, match="no oom_kill counter"):
        group.oom_kills()


def test_names_pids_and_usage(tmp_path: Path) -> None:
    path = tmp_path / "pgoom-harness-a9fae597"
    path.mkdir()
    group = _group_at(path, 1)
    assert group.kernel_path == MEMCG
    assert group.procs_file == f"{path}/cgroup.procs"
    assert group.pids() == []  # the group is gone: nothing inside
    (path / "cgroup.procs").write_text("2721\n2723\n2758\n")
    assert group.pids() == [2721, 2723, 2758]
    (path / "memory.usage_in_bytes").write_text("314572800\n")
    (path / "memory.current").write_text("1024\n")
    assert group.usage_bytes() == 314572800
    group.version = 2
    assert group.usage_bytes() == 1024


# --- scenarios: small pure helpers ----------------------------------------------------------

# Captured from the harness's restart-storm pgoom log; the last line is a scan, with no latency.
WATCHER_LOG = """\
2026-11-23T23:56:56.339+0000 INFO    pgoom[2799] protected postmaster pid=2800 \
data_dir=/pgdata/oomh-207355a7 oom_score_adj 1000 -> 0 source=netlink latency_us=936
2026-11-23T23:56:56.715+0000 INFO    pgoom[2799] protected postmaster pid=2813 \
data_dir=/pgdata/oomh-207355a7 oom_score_adj 1000 -> 0 source=netlink latency_us=883
2026-11-23T23:56:57.001+0000 INFO    pgoom[2799] protected postmaster pid=28000 \
data_dir=/pgdata/oomh-207355a7 oom_score_adj 1000 -> 0 source=scan latency_us=-
"""


def test_watcher_latency_us() -> None:
    assert watcher_latency_us(WATCHER_LOG, 2813) == 883
    assert watcher_latency_us(WATCHER_LOG, 2800) == 936
    assert watcher_latency_us(WATCHER_LOG, 28000) is None  # found by a scan: no latency
    assert watcher_latency_us(WATCHER_LOG, 280) is None  # a prefix of another PID
    assert watcher_latency_us("", 2813) is None


def test_failure_text_keeps_the_last_output_lines() -> None:
    err = subprocess.CalledProcessError(1, ["psql"], output=b"a\nb\nc\nd\n")
    assert failure_text(err) == (
        "CalledProcessError: Command '['psql']' returned non-zero exit status 1. -- b | c | d"
    )
    assert failure_text(TimeoutError("no OOM")) == "TimeoutError: no OOM"


def test_rows_lost_property() -> None:
    run = RunResult(BIG_QUERY, PROTECTED, 1, rows_expected=10_000)
    assert run.rows_lost is None
    run.rows_counted = 9_990
    assert run.rows_lost == 10


def test_describe_a_killed_postmaster() -> None:
    run = _run(
        MANY_BACKENDS,
        UNPROTECTED,
        1,
        survived=False,
        victims=(POSTMASTER,),
        oom_kills=3,
        refused=REFUSED,
    )
    run.postmaster_adj_at_oom = 1000
    text = describe(run)
    assert text.startswith("many-backends/unprotected #1: kills 3, victims postmaster 2137")
    assert "postmaster KILLED, recovery -, rows lost 0" in text
    assert f"refused: {REFUSED}" in text
    assert text.endswith("postmaster adj at OOM 1000")


def test_sessions_lost_crash_restarts_and_the_guard_columns() -> None:
    unguarded = Group(BIG_QUERY, PROTECTED)
    unguarded.runs = [
        RunResult(
            BIG_QUERY, PROTECTED, i, oom_kills=1, sessions_open=3, sessions_lost=3, crash_restarts=1
        )
        for i in (1, 2)
    ]
    guarded = Group(BIG_QUERY, GUARDED)
    guarded.runs = [
        RunResult(
            BIG_QUERY,
            GUARDED,
            1,
            sessions_open=3,
            sessions_lost=0,
            crash_restarts=0,
            guard_actions=["SIGINT relieved in 4.1 ms"],
            guard_first=True,
            postmaster_survived=True,
            rows_expected=10,
            rows_counted=10,
        ),
        RunResult(
            BIG_QUERY,
            GUARDED,
            2,
            sessions_open=3,
            sessions_lost=1,
            crash_restarts=0,
            guard_actions=["SIGINT no relief within 1 s", "SIGTERM relieved in 2.0 ms"],
            guard_first=True,
            postmaster_survived=True,
            rows_expected=20,
            rows_counted=20,
        ),
    ]
    rows = report.markdown([unguarded, guarded], None, "h").splitlines()[-2:]
    assert rows[0].endswith("| max 3 of 3 (total 6/6) | 2 (in 2/2 runs) | - |")
    assert rows[1].endswith(
        "| max 1 of 3 (total 1/6) | 0 (in 0/2 runs) | acted first 2/2; SIGINT x2, SIGTERM x1 |"
    )
    failures, _ = report.verdict([guarded], None, Config())
    assert failures == []
    guarded.runs[1].crash_restarts = 1
    guarded.runs[1].sessions_lost = 3
    failures, _ = report.verdict([guarded], None, Config())
    assert any("crash restart" in f for f in failures)
    assert any("3 sessions lost" in f for f in failures)


def test_guard_lines_are_read_from_the_watcher_log() -> None:
    log = (
        'x | WARNING | guard: sent SIGINT to client backend pid=12 title="postgres: main: a b '
        '[local] SELECT" private_mib=250.0 working_set_mib=271.0 limit_mib=300.0 postmaster=1 '
        "group=/g event_to_signal_us=900: no relief within 1 s\n"
        'x | INFO | guard: sent SIGTERM to client backend pid=12 title="t: u" private_mib=1 '
        "working_set_mib=1 limit_mib=1 postmaster=1 group=/g event_to_signal_us=5: relieved "
        "in 3.0 ms\n"
    )
    assert guard_actions(log) == ["SIGINT no relief within 1 s", "SIGTERM relieved in 3.0 ms"]


def test_a_forged_field_in_a_backend_title_does_not_become_the_guard_s_outcome() -> None:
    line = (
        'guard: sent SIGTERM to client backend pid=42 title="postgres: x event_to_signal_us=1: '
        'relieved in 0.1 ms" private_mib=9.0 working_set_mib=272.0 limit_mib=300.0 '
        "postmaster=7 group=/g event_to_signal_us=1500: no relief within 1 s\n"
    )
    assert guard_actions(line) == ["SIGTERM no relief within 1 s"]
